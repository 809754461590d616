"""Faults: a trainer SIGKILLed at random points of several rounds. The registry only holds
whole versions, no run stays ``running``, and a last uninterrupted round counts every feedback
item exactly once. Figures go to the ``faults`` section of the reliability report.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

from sqlmodel import select

from shared.db import session
from shared.policies import active_version
from shared.schema import Policy, TrainingRun
from tests.reliability._faults import REPO, wait_for
from tests.trainer.trainer_helpers import DataDir, add_feedback, make_data_dir
from trainer.config import TrainerConfig
from trainer.feedback import load_watermark, pending
from trainer.loop import OnlineTrainer
from trainer.reward import RewardRegistry

TRAINER_KILLS = 4
# where a kill is aimed: this long (at most, uniformly) after the event is seen
KILL_AFTER_S = {"round_started": 5.0, "reward_model_saved": 1.5, "candidate_publishing": 0.3}
TRAINER_SETS = {
    "settle_seconds": 0,
    "rm_max_steps": 2,
    "pref_max_steps": 2,
    "gate_prompts": 4,
    "gate_max_new_tokens": 8,
    "threads": 1,
    "gate_min_reward_gain": -1e9,
}


def _trainer(dd: DataDir, log: Path) -> subprocess.Popen:
    sets = [arg for k, v in TRAINER_SETS.items() for arg in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "palmchat", "trainer", "--data-dir", str(dd.root),
           "--metrics-port", "0", "--once", *sets]  # fmt: skip
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)


def _runs(dd: DataDir) -> list[TrainingRun]:
    with session(dd.ctx.engine) as s:
        return list(s.exec(select(TrainingRun).order_by(TrainingRun.id)).all())


def _assert_consistent(dd: DataDir) -> None:
    """Every visible policy and reward model version is whole; the active one loads."""
    registry = dd.ctx.registry
    for version in registry.versions():
        registry.verify(version)
    rewards = RewardRegistry(dd.ctx.reward_root)
    for version in rewards.versions():
        rewards.load(version)
    with session(dd.ctx.engine) as s:
        active = s.exec(select(Policy).where(Policy.status == "active")).all()
    assert len(active) == 1
    registry.load(active[0].version)


def _temp_dirs(dd: DataDir) -> set[str]:
    return {p.name for p in dd.ctx.registry.root.glob(".tmp-*")}


def _phase(dd: DataDir, run: TrainingRun | None, temp_dirs: set[str]) -> str:
    """Where a killed round was, judged from what it left behind (``temp_dirs``: the
    registry's half-written directories from before the round)."""
    if run is None:
        return "before_round"
    if run.status != "running":
        return f"finished_{run.status}"
    if run.candidate_version:
        return "published_not_activated"
    if _temp_dirs(dd) - temp_dirs:
        return "publishing"
    return "training"


def test_trainer_killed_at_random_points_resumes_from_its_watermark(
    tmp_path: Path, tiny_seed_dir: Path, reliability_report
) -> None:
    dd = make_data_dir(tmp_path / "data", tiny_seed_dir)
    ctx = dd.ctx
    total = 0

    def more_feedback(n_prompts: int, seed: int) -> None:
        nonlocal total
        before = pending(ctx.engine, load_watermark(ctx.engine)).total
        add_feedback(dd, n_prompts=n_prompts, seed=seed)
        total += pending(ctx.engine, load_watermark(ctx.engine)).total - before

    more_feedback(5, seed=0)
    seed = int(os.environ.get("PALMCHAT_FAULTS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    phases = []
    rewards = RewardRegistry(ctx.reward_root)
    log = tmp_path / "trainer.log"
    # every kind of aim once, plus one more at random; the delays are random too
    aims = [*KILL_AFTER_S, rng.choice(list(KILL_AFTER_S))][:TRAINER_KILLS]
    rng.shuffle(aims)
    for i, aim in enumerate(aims):
        known = (len(_runs(dd)), len(rewards.versions()), len(dd.ctx.registry.versions()))
        temp_dirs = _temp_dirs(dd)
        events = {
            "round_started": lambda k=known: len(_runs(dd)) > k[0],
            "reward_model_saved": lambda k=known: len(rewards.versions()) > k[1],
            "candidate_publishing": lambda k=known: (
                any(dd.ctx.registry.root.glob(".tmp-*")) or len(dd.ctx.registry.versions()) > k[2]
            ),
        }
        proc = _trainer(dd, log)
        try:
            wait_for(lambda p=proc, e=events[aim]: e() or p.poll() is not None, 120, aim)
            try:
                proc.wait(timeout=rng.uniform(0.0, KILL_AFTER_S[aim]))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        runs = _runs(dd)
        if proc.returncode == -signal.SIGKILL:
            phases.append(_phase(dd, runs[-1] if len(runs) > known[0] else None, temp_dirs))
        else:
            assert proc.returncode == 0, log.read_text()[-3000:]
            phases.append("completed")
        if pending(ctx.engine, load_watermark(ctx.engine)).total == 0:
            more_feedback(2, seed=100 + i)  # a round finished: give the next one work
        # after every kill: nothing half-published is visible, the active version loads
        _assert_consistent(dd)
        assert sum(r.status == "running" for r in _runs(dd)) <= 1

    # the next start (in this process, uninterrupted) cleans up and finishes the work
    result = OnlineTrainer(ctx, TrainerConfig.from_flat(**TRAINER_SETS)).run_round(force=True)
    assert result.status == "published", result.reasons
    runs = _runs(dd)
    _assert_consistent(dd)
    assert [r.status for r in runs if r.status == "running"] == []
    finished = [r for r in runs if r.status in ("published", "rejected")]
    killed = [r for r in runs if r.status == "failed"]
    assert len(killed) == sum(
        p in ("training", "publishing", "published_not_activated") for p in phases
    )
    # every feedback item was consumed by exactly one finished round
    assert sum(r.n_feedback for r in finished) == total
    assert pending(ctx.engine, load_watermark(ctx.engine)).total == 0
    assert active_version(ctx.engine) == finished[-1].candidate_version
    with session(ctx.engine) as s:
        policies = {p.version: p for p in s.exec(select(Policy)).all()}
    for run in killed:  # a killed round's candidate is never left waiting or served
        if run.candidate_version:
            assert policies[run.candidate_version].status == "rejected"
    reliability_report.record(
        "faults",
        trainer_kills=sum(p != "completed" for p in phases),
        trainer_kill_aims=aims,
        trainer_kill_phases=phases,
        trainer_kill_seed=seed,
        trainer_rounds_failed_then_recovered=len(killed),
        trainer_feedback_items=total,
        trainer_feedback_counted_once=True,
    )
