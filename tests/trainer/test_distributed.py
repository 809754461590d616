"""The trainer under torchrun: two CPU processes (DDP over gloo) complete a tiny PPO round."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlmodel import select
from trainer_helpers import add_feedback

from shared.db import session
from shared.schema import TrainingRun

REPO = Path(__file__).resolve().parents[2]


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
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "palmchat", "trainer", "--once", "--algo", "ppo", "--metrics-port", "0",
        "--data-dir", str(data_dir.root),
    ]  # fmt: skip
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with session(data_dir.ctx.engine) as s:
        (run,) = s.exec(select(TrainingRun)).all()
    assert run.status == "published"
    ppo = run.metrics["policy"]
    # each rank sampled 4 rollouts; the statistics were reduced over both
    assert ppo["rollouts"] == 8 and ppo["iterations"] == 1
    assert run.metrics["reward_model"]["steps"] == 2
    assert proc.stdout.count('"status": "published"') == 1  # only rank 0 reports
