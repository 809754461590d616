"""``python -m bench.deployed --tiny`` runs every measurement of the deployed-size benchmark on
a CPU and writes what a reader looks at; ``ops/bench/gpu.sh``, which runs it at ~1B parameters
on a GPU, is valid bash within its 10 minutes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BATCHES = {"1", "8", "32", "64"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    """(the JSON, the printed table, the results folder) of one tiny CPU run. One thread: on
    shared cores a many-thread copy waits for descheduled threads, which would measure the
    scheduler instead of the memory bandwidth."""
    out = tmp_path_factory.mktemp("deployed")
    argv = ["--tiny", "--device", "cpu", "--repeats", "1", "--threads", "1", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "bench.deployed", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "deployed-latest.json").read_text()), done.stdout, out


def test_both_families_decode_at_every_batch_size_through_the_engine_and_hf(run):
    results, _, _ = run
    assert set(results["models"]) == {"palm", "llama"}
    new = results["new_tokens"]
    for entry in results["models"].values():
        for contender in ("engine", "hf_generate"):
            assert set(entry[contender]) == BATCHES
            for batch, timed in entry[contender].items():
                assert timed["tokens"] == int(batch) * new  # the end token ignored
                assert timed["median_tokens_per_s"] > 0
        assert set(entry["engine_vs_hf"]) == BATCHES
        assert all(ratio > 0 for ratio in entry["engine_vs_hf"].values())
    # the Llama's HF contender runs the same weights; PaLM's is a Llama of its size
    llama, palm = results["models"]["llama"], results["models"]["palm"]
    assert "same weights" in llama["hf_contender"]
    assert llama["hf_max_logit_gap_float32"] < 1e-3
    assert llama["hf_params"] == llama["params"]
    assert "random weights" in palm["hf_contender"]
    assert abs(palm["hf_params"] - palm["params"]) < 0.01 * palm["params"]


def test_prefill_is_timed_on_fresh_prompts_for_both_contenders(run):
    results, _, _ = run
    prompts = results["prefill_prompts"]
    for entry in results["models"].values():
        for contender in ("engine", "hf_forward"):
            timed = entry["prefill"][contender]
            assert timed["tokens"] == prompts["count"] * prompts["tokens"]
            assert timed["median_tokens_per_s"] > 0


def test_batch1_decode_is_a_share_of_the_roofline_measured_in_the_same_run(run):
    results, _, _ = run
    for entry in results["models"].values():
        roof = entry["roofline"]
        assert roof["copy_bandwidth_gb_s"] > 0 and roof["bytes_per_batch1_token"] > 0
        assert roof["engine_batch1_tokens_per_s"] == entry["engine"]["1"]["median_tokens_per_s"]
        share = roof["engine_batch1_share_of_roofline"]
        assert 0 < share < 1.5
        expected = roof["engine_batch1_tokens_per_s"] / roof["roofline_tokens_per_s"]
        assert share == pytest.approx(expected, rel=0.02, abs=1e-4)
    assert set(results["targets"]) == {"palm", "llama"}
    assert results["targets"]["llama"]["batch1_pct_of_roofline"]["target"] == 70
    assert results["targets"]["llama"]["batch64_vs_hf"]["target"] == 2


def test_one_dpo_step_with_lora_on_the_llama_is_timed(run):
    dpo = run[0]["dpo"]
    assert "skipped" not in dpo
    assert dpo["model"] == "llama" and dpo["lora_rank"] == 16 and dpo["pairs"] == 4
    assert dpo["trainable_params"] > 0
    assert dpo["step_seconds"] > 0 and len(dpo["runs_seconds"]) == 1


def test_results_are_written_timestamped_and_latest_and_printed_as_a_table(run):
    results, stdout, out = run
    stamped = [p for p in out.glob("deployed-*.json") if p.name != "deployed-latest.json"]
    assert len(stamped) == 1 and json.loads(stamped[0].read_text()) == results
    assert results["machine"]["device"] == "cpu" and results["machine"]["device_name"]
    assert results["machine"]["device_name"] in stdout
    assert re.search(r"\| palm .* \| palmchat engine \|", stdout)
    assert re.search(r"\| llama .* \| HF transformers generate \|", stdout)
    assert "% of the roofline" in stdout and "DPO/LoRA step" in stdout


def test_gpu_script_is_valid_bash_and_runs_the_deployed_benchmark_in_time():
    script = ROOT / "ops" / "bench" / "gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "set -u" in text
    assert re.search(r"python3 -m bench\.deployed --device cuda --repeats 3", text)
    assert "tests/server/engine " in text  # the engine's whole test directory on CUDA
    # every step under a timeout, together leaving a minute of the 10 for installs and imports
    timeouts = [int(t) for t in re.findall(r"^timeout (\d+) ", text, re.M)]
    assert len(timeouts) == 3 and sum(timeouts) <= 540


def test_the_deployed_sizes_are_about_a_billion_parameters_each():
    import torch

    from bench.deployed import SIZES
    from shared.families import build_model

    one_b = SIZES["1b"]
    with torch.device("meta"):  # shapes only, no memory
        params = [build_model(c).num_params() for c in (one_b.palm, one_b.llama)]
    assert all(0.9e9 < n < 1.2e9 for n in params), params


def test_palmchat_bench_deployed_help_names_its_options():
    from typer.testing import CliRunner

    from palmchat.app import app

    result = CliRunner().invoke(app, ["bench", "deployed", "--help"])
    assert result.exit_code == 0, result.output
    assert "bench deployed" in result.output
    for option in ("--tiny", "--device", "--repeats", "--out"):
        assert option in result.output
