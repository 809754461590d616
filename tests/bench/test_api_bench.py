"""``palmchat bench api`` end to end at a tiny size: every leg answers every request in full
(engine alone, both gateways, short chats, moderation on and off) and the results file says
so; its figures say nothing about speed at this size."""

from __future__ import annotations

import json
from pathlib import Path

from bench.api import run_api_benchmark


def test_the_api_benchmark_measures_every_leg_in_interleaved_rounds(tmp_path: Path) -> None:
    streams, new_tokens = 4, 6
    results = run_api_benchmark(
        streams,
        new_tokens,
        out_dir=tmp_path,
        short_rounds=2,
        moderation_rounds=1,
        stream_rounds=3,
    )
    assert json.loads((tmp_path / "api-latest.json").read_text()) == results
    assert results["stream_rounds"] == 3
    for leg in ("engine_alone", "through_api", "through_api_process"):
        assert results[leg]["tokens"] == streams * new_tokens  # no stream was cut short
        assert len(results[leg]["tokens_per_s_rounds"]) == 3
    assert results["api_vs_engine"] > 0 and results["api_process_vs_engine"] > 0
    short = results["short_chats"]
    assert set(short["runs"]) == {
        "engine", "api", "api_sequential", "api_process", "api_process_sequential"
    }  # fmt: skip
    for runs in short["runs"].values():
        assert len(runs) == 2 and all(r["requests"] == streams for r in runs)
    assert results["moderation"]["rounds"] == 1
