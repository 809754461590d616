"""The engine benchmark runs end to end and writes its JSON (tiny settings, no baselines)."""

from __future__ import annotations

import json

import pytest
from conftest import random_policy

from bench.engine import run_engine_benchmark
from bench.engine_report import markdown_table
from shared.checkpoints import Policy
from shared.tokenizer import ByteTokenizer


def test_benchmark_writes_json_with_every_contender_and_the_targets(tmp_path):
    policy = Policy("v1", random_policy(0), ByteTokenizer(300), {})
    results = run_engine_benchmark(
        new_tokens=4,
        concurrency=(1, 4, 16),
        sequential_requests=2,
        policy=policy,
        include_hf=False,
        include_reference=False,
        out_dir=tmp_path,
        engine_overrides={"kv_cache_memory_mb": 8},
        repeats=2,
    )
    written = json.loads((tmp_path / "engine-latest.json").read_text())
    assert written["engine"]["4"]["tokens"] == 16
    assert written["one_at_a_time"]["tokens"] == 8
    assert written["prefix_cache"]["n"] == 4
    # every contender ran once per round, and reports its best run
    for timed in (written["engine"]["1"], written["engine_async"]["4"], written["one_at_a_time"]):
        assert len(timed["runs_tokens_per_s"]) == 2
        assert timed["tokens_per_s"] == max(timed["runs_tokens_per_s"])
    for timed in (written["engine"]["1"], written["one_at_a_time"]):
        runs = sorted(timed["runs_tokens_per_s"])
        assert min(runs) <= timed["median_tokens_per_s"] <= max(runs)
    assert "batch32_vs_one_at_a_time" not in written["targets"]["engine"]  # no 32 measured
    # batch-1 decode against the bandwidth bound measured in the same run, on the CPU too
    roof = written["roofline"]
    assert roof["copy_bandwidth_gb_s"] > 0 and roof["bytes_per_batch1_token"] > 0
    assert roof["engine_batch1_tokens_per_s"] == written["engine"]["1"]["median_tokens_per_s"]
    share = 100 * roof["engine_batch1_tokens_per_s"] / roof["roofline_tokens_per_s"]
    assert roof["engine_batch1_pct_of_roofline"] == pytest.approx(share, rel=0.01)
    assert written["targets"]["batch1_pct_of_bandwidth_bound"]["target"] == 50
    # from 16 rows decode steps are timed onto one thread or every core: the same run measures
    # the engine with them pinned to one thread, and the gain
    assert set(written["engine_one_thread"]) == {"16"}
    assert written["engine_one_thread"]["16"]["tokens"] == 64
    assert written["every_core_vs_one_thread"]["16"] == round(
        written["engine"]["16"]["tokens_per_s"]
        / written["engine_one_thread"]["16"]["tokens_per_s"],
        2,
    )
    assert "| palmchat engine (continuous batching) |" in markdown_table(results)
