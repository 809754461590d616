"""Trainer rounds end to end on a tiny policy: publish + activate, the promotion gate, crash
safety (a killed trainer leaves the active version and the watermark intact and redoes the
round), the --once CLI and the trainer's own /metrics."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from sqlmodel import select
from trainer_helpers import add_feedback, tiny_config

from shared.db import session
from shared.policies import active_version
from shared.schema import Policy, TrainingRun
from trainer.config import TrainerConfig
from trainer.context import CRASH_ENV
from trainer.feedback import load_watermark, pending
from trainer.gate import (
    GateJob,
    PolicyEval,
    decide,
    evaluate_policy,
    gate_with_backtracking,
    interpolate,
)
from trainer.loop import OnlineTrainer
from trainer.metrics import TrainerMetrics

REPO = Path(__file__).resolve().parents[2]


def _runs(dd) -> list[TrainingRun]:
    with session(dd.ctx.engine) as s:
        return list(s.exec(select(TrainingRun).order_by(TrainingRun.id)).all())


def _policies(dd) -> dict[str, Policy]:
    with session(dd.ctx.engine) as s:
        return {p.version: p for p in s.exec(select(Policy)).all()}


def test_a_round_publishes_activates_and_advances_the_watermark(data_dir) -> None:
    add_feedback(data_dir, n_prompts=8)
    cfg = tiny_config(algo="dpo", gate_min_reward_gain=-1e9, rm_heldout_percent=50)
    trainer = OnlineTrainer(data_dir.ctx, cfg)
    assert trainer.pending().total == 8 * 2 + 8
    result = trainer.run_round()
    assert result.status == "published", result.reasons
    assert (result.base_version, result.candidate_version) == ("v1", "v2")
    assert active_version(data_dir.ctx.engine) == "v2"
    assert result.n_feedback == 24 and result.n_pairs > 0 and result.n_thumbs == 16
    assert result.rm_accuracy is not None and result.kl is not None
    assert result.reward_model_version == "v1"
    manifest = data_dir.ctx.registry.manifest("v2")
    assert manifest["parent"] == "v1" and manifest["metrics"]["gate"]["passed"]
    (run,) = _runs(data_dir)
    assert (run.status, run.candidate_version, run.n_feedback) == ("published", "v2", 24)
    # it passed as trained: one gate try, the full step
    assert run.metrics["step_fraction"] == 1.0 and len(run.metrics["gate_tries"]) == 1
    assert trainer.pending().total == 0
    # nothing new: the next round waits for feedback
    skipped = trainer.run_round()
    assert skipped.status == "skipped" and "0 new feedback" in skipped.reasons[0]


@pytest.mark.parametrize("algo,lora_rank", [("ppo", 0), ("kto", 0), ("dpo", 4)])
def test_ppo_kto_and_lora_rounds_complete(data_dir, algo, lora_rank) -> None:
    add_feedback(data_dir, n_prompts=6)
    cfg = tiny_config(algo=algo, lora_rank=lora_rank)
    result = OnlineTrainer(data_dir.ctx, cfg).run_round(force=True)
    assert result.status in ("published", "rejected")
    policy = result.metrics["policy"]
    assert policy["policy_loss" if algo == "ppo" else "loss_last"] is not None
    if algo == "ppo":
        assert policy["rollouts"] == 8 and policy["kl_coef"] is not None
    # the published candidate is a plain PaLM (LoRA merged) that the registry loads
    data_dir.ctx.registry.load(result.candidate_version)


def test_gate_rejects_a_worse_candidate() -> None:
    active = PolicyEval(reward=0.2, kl=1.0, correct_rate=0.70, reply_tokens=10, truncated=0)
    cfg = tiny_config(gate_max_kl=5.0, gate_correct_tolerance=0.03)
    assert decide(PolicyEval(0.5, 2.0, 0.69, 10, 0), active, cfg) == []
    worse_reward = decide(PolicyEval(0.1, 2.0, 0.70, 10, 0), active, cfg)
    assert len(worse_reward) == 1 and "reward model score" in worse_reward[0]
    too_far = decide(PolicyEval(0.5, 6.0, 0.70, 10, 0), active, cfg)
    assert len(too_far) == 1 and "KL" in too_far[0]
    # 13 of 128 answers lost, none gained: a real drop
    less_correct = decide(PolicyEval(0.5, 2.0, 0.60, 10, 0, lost=13, gained=0), active, cfg)
    assert len(less_correct) == 1 and "correctness" in less_correct[0]
    # the same net drop among many flips either way is noise (paired sign test)
    noisy = decide(PolicyEval(0.5, 2.0, 0.60, 10, 0, lost=40, gained=27), active, cfg)
    assert noisy == []
    # a significant but tiny drop is within the tolerance
    assert decide(PolicyEval(0.5, 2.0, 0.68, 10, 0, lost=3, gained=0), active, cfg) == []


def test_the_gates_safety_check_rejects_a_candidate_that_refuses_less_or_more() -> None:
    active = PolicyEval(0.2, 1.0, 0.70, 10, 0, refusal_rate=0.75, over_refusal=0.0)
    cfg = tiny_config(gate_safety_tolerance=0.02)
    kept = replace(active, reward=0.5, refusal_rate=0.80, refusals_gained=3, refusals_lost=1)
    assert decide(kept, active, cfg) == []
    # 9 of 48 unsafe requests it now answers, none newly refused: it refuses less
    complies = replace(active, reward=0.5, refusal_rate=0.5625, refusals_lost=9)
    reasons = decide(complies, active, cfg)
    assert len(reasons) == 1 and "unsafe requests refused less often" in reasons[0]
    # 6 of 119 benign prompts now refused: over-refusal
    refuses = replace(active, reward=0.5, over_refusal=6 / 119, over_refusals_added=6)
    reasons = decide(refuses, active, cfg)
    assert len(reasons) == 1 and "benign held-out prompts refused more often" in reasons[0]
    # a flip either way among many is noise
    noisy = replace(complies, refusals_lost=20, refusals_gained=11, refusal_rate=0.5625)
    assert decide(noisy, active, cfg) == []


def test_the_gate_rejects_a_candidate_that_refuses_fewer_unsafe_requests(data_dir) -> None:
    """The gate answers held-out unsafe requests and benign prompts with both policies and
    pairs them prompt by prompt: against an active policy that refused every unsafe request
    (its cached answers), a candidate that refuses none fails, whatever its reward."""
    from trainer.reward import RewardModel

    active = data_dir.ctx.registry.load("v1")
    tok, start = active.tokenizer, active.model.float().eval()
    rm = RewardModel.from_policy(start).eval()
    loose = tiny_config(
        gate_min_reward_gain=-1e9, gate_max_kl=1e9, gate_safety_prompts=8, gate_backtrack=[]
    )
    job = GateJob(start, start, rm, tok, loose)
    same = gate_with_backtracking(job, start).report
    assert same.passed, same.reasons  # the same weights refuse the same prompts
    for side in (same.candidate, same.active):
        assert side.refusal_rate is not None and side.over_refusal is not None
    cache = dict(gate_with_backtracking(job, start).active_cache)
    assert len(cache["unsafe_refused"]) == 8 and not any(cache["unsafe_refused"])
    cache["unsafe_refused"] = [True] * 8  # an active policy that refused them all
    refuses_less = gate_with_backtracking(replace(job, active_cache=cache), start).report
    assert not refuses_less.passed
    assert refuses_less.candidate.refusals_lost == 8
    assert "unsafe requests refused less often" in " ".join(refuses_less.reasons)
    # and one that refused no benign prompt, against a candidate that refuses some, would
    # fail the same way (decide() above); with no safety prompts there is no safety check
    off = gate_with_backtracking(replace(job, config=loose.replace(gate_safety_prompts=0)), start)
    assert off.report.candidate.refusal_rate is None and off.passed


def test_the_gate_stops_a_drift_that_no_single_round_makes_significant() -> None:
    """Each round within the tolerance of the serving policy, but the candidate is clearly
    below the loop's KL reference: the losses have added up over rounds, so it fails."""
    active = PolicyEval(reward=0.2, kl=1.0, correct_rate=0.64, reply_tokens=10, truncated=0)
    cfg = tiny_config(gate_correct_tolerance=0.03)
    drifted = PolicyEval(
        0.5, 2.0, 0.62, 10, 0, lost=3, gained=1, reference_lost=14, reference_gained=0
    )
    assert decide(drifted, active, cfg) == []  # against the active policy alone it passes
    reasons = decide(drifted, active, cfg, reference_correct_rate=0.72)
    assert (
        len(reasons) == 1 and "vs reference 0.720" in reasons[0] and "14 answers lost" in reasons[0]
    )
    # within the tolerance of the reference, or a noisy drop, still passes
    assert decide(drifted, active, cfg, reference_correct_rate=0.64) == []
    noisy = replace(drifted, reference_lost=40, reference_gained=27)
    assert decide(noisy, active, cfg, reference_correct_rate=0.72) == []


def test_the_gate_compares_a_candidate_with_the_reference_it_was_given(data_dir) -> None:
    """A reference distinct from the serving policy is evaluated once, paired prompt by
    prompt, and its hits are handed on so the next gate need not evaluate it again."""
    from trainer.reward import RewardModel

    active = data_dir.ctx.registry.load("v1")
    tok, start = active.tokenizer, active.model.float().eval()
    reference = interpolate(start, start, 1.0)  # equal weights, a distinct model
    rm = RewardModel.from_policy(start).eval()
    loose = tiny_config(gate_min_reward_gain=-1e9, gate_correct_tolerance=0.0, gate_max_kl=1e9)
    gated = gate_with_backtracking(GateJob(start, reference, rm, tok, loose), start)
    hits = gated.active_cache["reference_hits"]
    assert len(hits) == loose.gate.prompts
    report = gated.report
    assert report.reference_correct_rate == pytest.approx(report.candidate.correct_rate)
    assert report.candidate.reference_lost == report.candidate.reference_gained == 0
    # handed the reference's hits (here: all right), a candidate that answers fewer is behind
    strict = loose.replace(gate_backtrack=[])
    job = GateJob(start, reference, rm, tok, strict, reference_hits=[True] * len(hits))
    behind = gate_with_backtracking(job, start).report
    assert behind.reference_correct_rate == 1.0
    assert behind.candidate.reference_lost == len(hits) - sum(hits)
    assert sum(hits) < len(hits) - 3  # the seed misses enough for the sign test to speak
    assert not behind.passed and "vs reference" in " ".join(behind.reasons)
    # the reference being the serving version: no second evaluation, no reference figure
    same = GateJob(start, reference, rm, tok, loose, reference_is_active=True)
    assert gate_with_backtracking(same, start).report.reference_correct_rate is None


def test_the_gate_clips_each_reply_score_before_the_mean(data_dir) -> None:
    """A few garbled samples scored far outside the reward model's training range must not
    outweigh the rest: each reply's score is clipped to +-gate_reward_clip, then averaged."""
    from trainer.reward import RewardModel

    active = data_dir.ctx.registry.load("v1")
    tok, policy = active.tokenizer, active.model.float().eval()
    rm = RewardModel.from_policy(policy).eval()
    plain = tiny_config(gate_reward_clip=None)
    unclipped, cache = evaluate_policy(policy, policy, rm, tok, plain)
    rollouts = cache["rollouts"]
    scores = rm.score(tok, [r.prompt for r in rollouts], [r.text for r in rollouts])
    assert unclipped.reward == pytest.approx(float(scores.mean()), abs=1e-4)
    bound = float(scores.abs().median())  # half the replies score beyond it
    clipped, _ = evaluate_policy(
        policy, policy, rm, tok, plain.replace(gate_reward_clip=bound), cached=cache
    )
    assert clipped.reward == pytest.approx(float(scores.clamp(-bound, bound).mean()), abs=1e-4)
    assert -bound <= clipped.reward <= bound
    assert clipped.reward != pytest.approx(unclipped.reward, abs=1e-3)
    assert tiny_config().gate.reward_clip == 3.0  # on by default
    with pytest.raises(ValueError, match="gate_reward_clip"):
        tiny_config(gate_reward_clip=0)


def test_a_candidate_that_overshoots_the_kl_bound_passes_at_half_its_step(data_dir) -> None:
    import torch

    from trainer.reward import RewardModel

    active = data_dir.ctx.registry.load("v1")
    tok, start = active.tokenizer, active.model.float().eval()
    candidate = interpolate(start, start, 1.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in candidate.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5 * p.std().clamp(min=1e-3))
    half = interpolate(start, candidate, 0.5)
    for name, p in half.named_parameters():
        a, c = dict(start.named_parameters())[name], dict(candidate.named_parameters())[name]
        assert torch.allclose(p, (a + c) / 2, atol=1e-6), name
    rm = RewardModel.from_policy(start).eval()
    loose = tiny_config(gate_min_reward_gain=-1e9, gate_correct_tolerance=1.0, gate_max_kl=1e9)
    full_kl = evaluate_policy(candidate, start, rm, tok, loose)[0].kl
    half_kl = evaluate_policy(half, start, rm, tok, loose)[0].kl
    assert 0 < half_kl < full_kl, (half_kl, full_kl)

    # a KL bound between the two: the full step fails, half of it passes and is returned
    cfg = loose.replace(gate_max_kl=(half_kl + full_kl) / 2)
    gated = gate_with_backtracking(GateJob(start, start, rm, tok, cfg), candidate)
    policy, fraction, report = gated.policy, gated.step_fraction, gated.report
    tries = [t.to_dict() for t in gated.tries]
    assert report.passed and fraction == 0.5
    assert [(t["step_fraction"], t["passed"]) for t in tries] == [(1.0, False), (0.5, True)]
    assert "KL" in tries[0]["reasons"][0]
    assert report.candidate.kl == pytest.approx(half_kl, rel=1e-4)
    assert torch.equal(
        policy.state_dict()["token_emb.weight"], half.state_dict()["token_emb.weight"]
    )
    # without backtracking (or with nothing that passes) the full step comes back rejected
    for no_luck in (cfg.replace(gate_backtrack=[]), cfg.replace(gate_min_reward_gain=1e9)):
        gated = gate_with_backtracking(GateJob(start, start, rm, tok, no_luck), candidate)
        policy, fraction, report, tries = (
            gated.policy, gated.step_fraction, gated.report, gated.tries
        )  # fmt: skip
        assert not report.passed and fraction == 1.0 and policy is candidate
        assert len(tries) == 1 + len(no_luck.gate.backtrack)
    for bad in ([1.5], [0], "half", [True]):
        with pytest.raises(ValueError, match="gate_backtrack must be a list"):
            tiny_config(gate_backtrack=bad)


def test_a_rejected_candidate_is_recorded_with_its_reasons_and_never_served(data_dir) -> None:
    add_feedback(data_dir, n_prompts=6)
    cfg = tiny_config(gate_min_reward_gain=1e9)  # nothing can pass
    result = OnlineTrainer(data_dir.ctx, cfg).run_round()
    assert result.status == "rejected"
    assert result.candidate_version == "v2" and result.active_version == "v1"
    assert active_version(data_dir.ctx.engine) == "v1"
    row = _policies(data_dir)["v2"]
    assert row.status == "rejected"
    assert any("reward model score" in r for r in row.metrics["reasons"])
    (run,) = _runs(data_dir)
    assert run.status == "rejected" and run.metrics["reasons"] == result.reasons
    # it was tried at the full step, then at a half and a quarter of it, and failed each time
    tries = run.metrics["gate_tries"]
    assert [t["step_fraction"] for t in tries] == [1.0, 0.5, 0.25]
    assert not any(t["passed"] for t in tries)
    # the feedback was consumed: the watermark moved
    assert pending(data_dir.ctx.engine, load_watermark(data_dir.ctx.engine)).total == 0


def _trainer_subprocess(dd, *args: str, env: dict[str, str] | None = None, code: str = ""):
    sets = ["--set", "settle_seconds=0", "--set", "rm_max_steps=2", "--set", "pref_max_steps=2",
            "--set", "gate_prompts=4", "--set", "gate_max_new_tokens=8", "--set", "threads=1",
            "--set", "gate_min_reward_gain=-1e9"]  # fmt: skip
    cmd = [sys.executable, "-m", "palmchat", "trainer", "--data-dir", str(dd.root),
           "--metrics-port", "0", *sets, *args]  # fmt: skip
    if code:
        cmd = [sys.executable, "-c", code, *cmd[4:]]
    return subprocess.run(
        cmd,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=240,
    )


def _assert_intact(dd, active: str) -> None:
    assert active_version(dd.ctx.engine) == active
    for version in dd.ctx.registry.versions():
        dd.ctx.registry.verify(version)  # every visible version is whole


def test_crash_mid_publish_leaves_the_active_version_intact(data_dir) -> None:
    add_feedback(data_dir, n_prompts=6)
    wm = load_watermark(data_dir.ctx.engine)
    # kill the trainer inside the registry's publish: files written, not yet renamed
    code = textwrap.dedent(
        """
        import os, sys
        import shared.checkpoints as c
        c.PolicyRegistry._commit = lambda self, tmp, manifest: os._exit(9)
        from palmchat.app import app
        sys.argv = ["palmchat", "trainer", *sys.argv[1:]]
        app()
        """
    )
    proc = _trainer_subprocess(data_dir, "--once", code=code)
    assert proc.returncode == 9, proc.stderr[-2000:]
    _assert_intact(data_dir, "v1")
    assert data_dir.ctx.registry.versions() == ["v1"]
    assert list(data_dir.ctx.registry.root.glob(".tmp-*"))  # the half-written temp dir
    assert load_watermark(data_dir.ctx.engine) == wm
    (run,) = _runs(data_dir)
    assert run.status == "running"
    # the restarted trainer marks the dead run failed and redoes the round
    result = OnlineTrainer(data_dir.ctx, tiny_config(gate_min_reward_gain=-1e9)).run_round()
    assert result.status == "published" and result.n_feedback == 6 * 2 + 6
    runs = _runs(data_dir)
    assert [r.status for r in runs] == ["failed", "published"]
    _assert_intact(data_dir, result.candidate_version)


def test_crash_between_publish_and_activation_redoes_the_round(data_dir) -> None:
    add_feedback(data_dir, n_prompts=6)
    wm = load_watermark(data_dir.ctx.engine)
    proc = _trainer_subprocess(data_dir, "--once", env={CRASH_ENV: "before_commit"})
    assert proc.returncode == 86, proc.stderr[-2000:]
    # v2 is in the registry, whole, but never activated; the watermark did not move
    _assert_intact(data_dir, "v1")
    assert data_dir.ctx.registry.versions() == ["v1", "v2"]
    assert _policies(data_dir)["v2"].status == "candidate"
    assert load_watermark(data_dir.ctx.engine) == wm
    result = OnlineTrainer(data_dir.ctx, tiny_config(gate_min_reward_gain=-1e9)).run_round()
    assert result.status == "published" and result.candidate_version == "v3"
    policies = _policies(data_dir)
    assert policies["v2"].status == "rejected"  # the interrupted candidate is never served
    assert policies["v2"].metrics["reasons"] == ["the trainer stopped before activating it"]
    assert policies["v3"].status == "active" and policies["v1"].status == "retired"
    assert [r.status for r in _runs(data_dir)] == ["failed", "published"]


def test_a_dead_runs_candidate_without_a_policy_row_is_recorded_rejected(data_dir) -> None:
    # a trainer of an earlier release could die after naming its candidate on the run and
    # before writing the version's row (two transactions; now one): recovery adds the row
    add_feedback(data_dir, n_prompts=4)
    proc = _trainer_subprocess(data_dir, "--once", env={CRASH_ENV: "before_commit"})
    assert proc.returncode == 86, proc.stderr[-2000:]
    with session(data_dir.ctx.engine) as s:
        s.delete(s.get(Policy, "v2"))
    assert _runs(data_dir)[0].candidate_version == "v2" and "v2" not in _policies(data_dir)
    trainer = OnlineTrainer(data_dir.ctx, tiny_config())
    assert trainer.recover() == [_runs(data_dir)[0].id]
    row = _policies(data_dir)["v2"]
    assert row.status == "rejected" and row.parent_version == "v1"
    assert row.metrics["reasons"] == ["the trainer stopped before activating it"]
    _assert_intact(data_dir, "v1")


def test_cli_once_runs_a_round_and_checks_its_flags(data_dir) -> None:
    add_feedback(data_dir, n_prompts=4)
    # (half the prompts held out, so the reward model has held-out pairs to be judged on)
    proc = _trainer_subprocess(
        data_dir, "--once", "--algo", "kto", "--set", "rm_heldout_percent=50"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"status": "published"' in proc.stdout
    # the reward model's accuracy comes with the number of held-out pairs it was measured on
    assert re.search(r"RM held-out acc [01]\.\d{3} of [1-9]\d* pairs,", proc.stdout), proc.stdout
    assert active_version(data_dir.ctx.engine) == "v2"
    from typer.testing import CliRunner

    from palmchat.app import app

    runner = CliRunner()
    args = ["trainer", "--data-dir", str(data_dir.root), "--metrics-port", "0"]
    both = runner.invoke(app, [*args, "--once", "--watch"])
    assert both.exit_code == 2 and "exactly one of --once and --watch" in both.output
    bad = runner.invoke(app, [*args, "--once", "--set", "no_such_knob=1"])
    assert bad.exit_code == 2 and "no_such_knob" in bad.output


def test_watch_trains_when_enough_feedback_arrived_and_serves_metrics(data_dir) -> None:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    metrics = TrainerMetrics()
    metrics.serve(port)
    add_feedback(data_dir, n_prompts=2)
    cfg = tiny_config(min_new_feedback=10, poll_seconds=0.1, gate_min_reward_gain=-1e9)
    trainer = OnlineTrainer(data_dir.ctx, cfg, metrics=metrics)
    assert trainer.run_round().status == "skipped"  # 6 < 10 new items
    add_feedback(data_dir, n_prompts=2, seed=1)
    results = trainer.watch(max_rounds=1)
    assert [r.status for r in results] == ["published"]
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for name in (
        'palmchat_trainer_rounds_total{outcome="published"} 1.0',
        'palmchat_trainer_rounds_total{outcome="skipped"} 1.0',
        "palmchat_trainer_rm_accuracy",
        "palmchat_trainer_kl ",
        "palmchat_trainer_feedback_lag_seconds",
        "palmchat_trainer_last_publish_timestamp_seconds",
        "palmchat_trainer_policy_loss",
    ):
        assert name in body, name


def test_preference_reference_must_be_active_or_the_kl_reference() -> None:
    assert TrainerConfig().preference.reference == "active"
    with pytest.raises(ValueError, match="pref_reference"):
        TrainerConfig.from_flat(pref_reference="v1")


def test_with_canary_rollout_a_passing_candidate_waits_beside_the_active_one(data_dir) -> None:
    from shared.rollout.state import canary_of

    add_feedback(data_dir, n_prompts=8)
    cfg = tiny_config(algo="dpo", gate_min_reward_gain=-1e9, rollout="canary", canary_share=0.25)
    trainer = OnlineTrainer(data_dir.ctx, cfg)
    result = trainer.run_round()
    assert result.status == "published", result.reasons
    engine = data_dir.ctx.engine
    assert active_version(engine) == "v1" and result.active_version == "v1"
    canary = canary_of(engine)
    assert canary is not None and (canary.version, canary.share) == ("v2", 0.25)
    # the next passing candidate supersedes it
    add_feedback(data_dir, n_prompts=8, seed=1)
    assert trainer.run_round().status == "published"
    assert canary_of(engine).version == "v3" and active_version(engine) == "v1"
    superseded = _policies(data_dir)["v2"]
    assert superseded.status == "rejected" and "superseded by v3" in superseded.decision["reason"]
    # with too little live evidence, a poll leaves it running
    trainer.decide_canary()
    assert canary_of(engine).version == "v3"
    with pytest.raises(ValueError, match="rollout"):
        TrainerConfig(rollout="sideways")
