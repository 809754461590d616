"""The demo world: synthetic chat tasks, the scripted rater, simulated users, the demo driver.

Used by the trainer's gate (held-out correctness), pretraining's default corpus, the
``palmchat simulate`` / ``palmchat demo`` commands and the tests; never by serving.
"""
