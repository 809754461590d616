"""A round's records: its ``training_runs`` row from start to end, and its last step, the
publication of the candidate and the **one transaction** that activates it (or records it
``rejected``), finishes the run row and advances the watermark.

Crash safety: the registry only ever shows whole versions; the active policy and the watermark
change only in that transaction, so a trainer killed at any point redoes the round after a
restart. A run left ``running`` is marked ``failed`` at the next start
(:func:`recover_stale_runs`) and its published-but-never-activated candidate ``rejected``.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import Any

from sqlmodel import select

from shared.db import session
from shared.families import PolicyModel
from shared.policies import activate_row, active_version, add_version_row
from shared.rollout.state import begin_canary_row
from shared.schema import Policy, TrainingRun, utcnow
from shared.tokenizer import Tokenizer
from trainer.config import TrainerConfig
from trainer.context import TrainerContext, crash_point
from trainer.feedback import Watermark, get_state, save_watermark, set_state
from trainer.round import RoundResult

log = logging.getLogger(__name__)

REFERENCE_KEY, KL_COEF_KEY = "reference_version", "kl_coef"
Phase = Callable[[str, int, int, str], None]


def recover_stale_runs(ctx: TrainerContext) -> list[int]:
    """Mark runs a killed trainer left ``running`` as failed; their never-activated
    candidates become ``rejected``. Returns the ids of those runs."""
    now = utcnow()
    with session(ctx.engine) as s:
        stale = s.exec(select(TrainingRun).where(TrainingRun.status == "running")).all()
        for run in stale:
            run.status, run.finished_at = "failed", now
            run.metrics = {**run.metrics, "error": "trainer stopped before the round ended"}
            s.add(run)
            version = run.candidate_version
            if version and s.get(Policy, version) is None:
                # published by a trainer that died before recording it (older versions
                # wrote the run and the row in two transactions)
                add_version_row(s, ctx.registry, version, "candidate")
                s.flush()
            row = s.get(Policy, version) if version else None
            if row is not None and row.status == "candidate":
                row.status = "rejected"
                row.metrics = {
                    **row.metrics,
                    "status": "rejected",
                    "reasons": ["the trainer stopped before activating it"],
                }
                s.add(row)
        return [r.id for r in stale if r.id is not None]  # rows read back all have ids


def start_run(
    ctx: TrainerContext,
    algo: str,
    base: str,
    reference: str,
    n_feedback: int,
    watermark: Watermark,
) -> int:
    """Write the round's ``running`` row (and, in the first round, the KL reference)."""
    first_round = get_state(ctx.engine, REFERENCE_KEY) is None
    with session(ctx.engine) as s:
        if first_round:
            set_state(s, REFERENCE_KEY, reference)
        run = TrainingRun(
            algo=algo,
            base_version=base,
            n_feedback=n_feedback,
            feedback_watermark=watermark.feedback_id,
            metrics={"watermark_to": watermark.to_json(), "reference": reference},
        )
        s.add(run)
        s.flush()
        assert run.id is not None  # flushed: the database gave it one
        return run.id


def fail_run(ctx: TrainerContext, run_id: int | None, error: BaseException) -> None:
    """Record a round that raised (best effort: the database may be what failed)."""
    if run_id is None:
        return
    try:
        with session(ctx.engine) as s:
            run = s.get(TrainingRun, run_id)
            if run is not None and run.status == "running":
                run.status, run.finished_at = "failed", utcnow()
                run.metrics = {
                    **run.metrics,
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc(limit=5),
                }
                s.add(run)
    except Exception:  # the database may be what failed
        log.exception("could not record the failure of run %s", run_id)


def commit_round(
    ctx: TrainerContext,
    config: TrainerConfig,
    *,
    run_id: int,
    base: str,
    policy: PolicyModel,
    tok: Tokenizer,
    gate_reasons: list[str],
    metrics: dict[str, Any],
    watermark: Watermark,
    kl_coef: float | None,
    phase: Phase,
) -> RoundResult:
    """Publish the candidate and record the outcome; the activation, the run row and the
    watermark change together in one transaction. ``metrics``: ``RoundMetrics.to_dict()``."""
    engine, registry = ctx.engine, ctx.registry
    reasons = list(gate_reasons)
    now_active = active_version(engine)
    if now_active != base:
        reasons.append(f"the active policy changed during the round ({base} -> {now_active})")
    passed = not reasons
    version = None
    if passed or config.publish_rejected:
        phase("publish", 0, 1, "writing the registry")
        version = registry.publish(
            policy.float().cpu(),
            tok,
            parent=base,
            metrics={
                **metrics,
                "status": ("canary" if config.rollout == "canary" else "active")
                if passed
                else "rejected",
                "reasons": reasons,
            },
            recipe={
                "trainer": config.to_dict(),
                "run_id": run_id,
                "reward_model": metrics["reward_model"].get("version"),
            },
        )
        crash_point("after_publish")
        with session(engine) as s:  # the run and the version's row know of each other
            run = s.get(TrainingRun, run_id)
            assert run is not None  # written when the round began
            run.candidate_version = version
            s.add(run)
            add_version_row(s, registry, version, "candidate" if passed else "rejected")
        if passed:
            registry.verify(version)  # never activate files that do not check out
        crash_point("before_commit")
    with session(engine) as s:
        if passed:
            assert version is not None  # published above
            if config.rollout == "canary":  # served beside the active one until decided
                begin_canary_row(s, version, config.canary_share)
            else:
                activate_row(s, version)
        run = s.get(TrainingRun, run_id)
        assert run is not None  # written when the round began
        run.status = "published" if passed else "rejected"
        run.finished_at = utcnow()
        run.candidate_version = version
        run.feedback_watermark = watermark.feedback_id
        run.metrics = {**run.metrics, **metrics, "reasons": reasons}
        s.add(run)
        save_watermark(s, watermark)
        if kl_coef is not None:
            set_state(s, KL_COEF_KEY, kl_coef)
    outcome = ("canary" if config.rollout == "canary" else "active") if passed else "rejected"
    phase("publish", 1, 1, f"{version or 'not published'} {outcome}")
    if passed:
        log.info("round %d: %s published and %s (parent %s)", run_id, version, outcome, base)
    else:
        log.info("round %d: candidate %s rejected: %s", run_id, version, "; ".join(reasons))
    return RoundResult(
        status="published" if passed else "rejected",
        run_id=run_id,
        base_version=base,
        candidate_version=version,
        active_version=version if passed and config.rollout == "direct" else now_active,
        reward_model_version=metrics["reward_model"].get("version"),
        n_feedback=metrics["feedback"]["new"],
        n_pairs=metrics["feedback"]["pairs"],
        n_thumbs=metrics["feedback"]["thumbs"],
        reasons=reasons,
        metrics=metrics,
    )
