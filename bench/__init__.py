"""Benchmarks of the engine and the API, each against a baseline in the same run (JSON under
``ops/bench/results/``); run through ``palmchat bench``."""
