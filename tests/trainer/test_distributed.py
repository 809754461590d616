"""The trainer under torchrun: two CPU processes (DDP over gloo) complete a tiny PPO round,
and a DPO round with the policy sharded by FSDP2 trains the same weights as one with DDP."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from sqlmodel import select
from trainer_helpers import add_feedback

from shared.checkpoints import PolicyRegistry
from shared.db import session
from shared.schema import TrainingRun

REPO = Path(__file__).resolve().parents[2]


def _torchrun_round(data_root: Path, algo: str, sets: dict[str, object]) -> str:
    """``palmchat trainer --once`` in two processes on ``data_root``; returns rank 0's output."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "palmchat", "trainer", "--once", "--algo", algo, "--metrics-port", "0",
        "--data-dir", str(data_root),
    ]  # fmt: skip
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _weights(data_root: Path, version: str) -> dict:
    return load_file(
        str(PolicyRegistry(data_root / "policies").path(version) / "model.safetensors")
    )


def test_torchrun_two_process_ddp_round_on_cpu(data_dir) -> None:
    add_feedback(data_dir, n_prompts=6)
    sets = {
        "settle_seconds": 0,
        "rm_max_steps": 2,
        "rm_batch_size": 4,
        "ppo_iterations": 1,
        "ppo_rollouts": 8,
        "ppo_epochs": 1,
        "ppo_minibatch": 4,
        "value_warmup_steps": 1,
        "max_new_tokens": 8,
        "gate_prompts": 4,
        "gate_max_new_tokens": 8,
        "threads": 1,
        "gate_min_reward_gain": -1e9,
    }
    stdout = _torchrun_round(data_dir.root, "ppo", sets)
    with session(data_dir.ctx.engine) as s:
        (run,) = s.exec(select(TrainingRun)).all()
    assert run.status == "published"
    ppo = run.metrics["policy"]
    # each rank sampled 4 rollouts; the statistics were reduced over both
    assert ppo["rollouts"] == 8 and ppo["iterations"] == 1
    assert run.metrics["reward_model"]["steps"] == 2
    assert stdout.count('"status": "published"') == 1  # only rank 0 reports


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_a_dpo_round_sharded_with_fsdp_trains_what_ddp_trains(
    data_dir, tmp_path, lora_rank
) -> None:
    add_feedback(data_dir, n_prompts=6)
    twin = Path(shutil.copytree(data_dir.root, tmp_path / "twin"))  # the same feedback, twice
    sets = {
        "settle_seconds": 0, "rm_max_steps": 2, "rm_batch_size": 4, "pref_max_steps": 3,
        "pref_min_steps": 3, "pref_batch_size": 4, "dpo_rm_prompts": 0, "max_new_tokens": 8,
        "gate_prompts": 4, "gate_max_new_tokens": 8, "threads": 1, "gate_min_reward_gain": -1e9,
        "lora_rank": lora_rank,
    }  # fmt: skip
    _torchrun_round(data_dir.root, "dpo", {**sets, "parallel": "ddp"})
    _torchrun_round(twin, "dpo", {**sets, "parallel": "fsdp"})
    ddp, fsdp, seed = _weights(data_dir.root, "v2"), _weights(twin, "v2"), _weights(twin, "v1")
    assert ddp.keys() == fsdp.keys()
    moved = max((ddp[k] - seed[k]).abs().max().item() for k in ddp)
    assert moved > 1e-4  # the round trained something
    assert max((ddp[k] - fsdp[k]).abs().max().item() for k in ddp) <= 1e-5
