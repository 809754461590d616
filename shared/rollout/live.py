"""A running canary's live evidence from the log, and the decision it leads to.

:func:`canary_evidence` counts, on the answers each version gave since the canary started,
the users' thumbs and the answers' mean length; the held-out correctness and refusal rates
come from the canary's own promotion gate, which measured it and the active version on the
same prompts. :func:`decide_canary` feeds them to the always-valid test and the guards
(:mod:`shared.rollout.sequential`, :mod:`shared.rollout.guards`) and, on a promote or a
rollback, ends the canary with the evidence recorded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import case, func
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from shared.db import session
from shared.policies import active_version
from shared.rollout.guards import GuardConfig, VersionSummary, guard_vetoes
from shared.rollout.sequential import RolloutConfig, RolloutDecision, ThumbCounts, decide_rollout
from shared.rollout.state import Canary, abort_canary, canary_of, promote_canary
from shared.schema import Feedback, Message, Policy

__all__ = ["CanaryEvidence", "canary_evidence", "decide_canary"]


@dataclass(frozen=True)
class CanaryEvidence:
    canary: Canary
    active_version: str
    active: ThumbCounts
    candidate: ThumbCounts  # the canary's
    active_summary: VersionSummary
    canary_summary: VersionSummary


def canary_evidence(engine: Engine, canary: Canary) -> CanaryEvidence:
    """The thumbs and summaries of the active version and ``canary`` since it started."""
    active = active_version(engine) or ""
    with session(engine) as s:
        since = col(Message.created_at) >= canary.started_at
        versions = col(Message.policy_version).in_([active, canary.version])
        thumbs = s.exec(
            select(
                Message.policy_version,
                func.sum(case((col(Feedback.rating) == 1, 1), else_=0)),
                func.sum(case((col(Feedback.rating) == -1, 1), else_=0)),
            )
            .join(Feedback, col(Feedback.message_id) == col(Message.id))
            .where(since, versions)
            .group_by(col(Message.policy_version))
        ).all()
        lengths = s.exec(
            select(Message.policy_version, func.avg(Message.completion_tokens))
            .where(since, versions, Message.role == "assistant", col(Message.incomplete).is_(False))
            .group_by(col(Message.policy_version))
        ).all()
        row = s.get(Policy, canary.version)
        gate = ((row.metrics if row is not None else {}) or {}).get("gate") or {}
    counts = {v: ThumbCounts(int(up or 0), int(down or 0)) for v, up, down in thumbs}
    mean = {v: float(n) for v, n in lengths if n is not None}

    def summary(version: str, side: str) -> VersionSummary:
        held = gate.get(side) or {}
        return VersionSummary(
            correctness=held.get("correct_rate"),
            refusal_rate=held.get("refusal_rate"),
            over_refusal_rate=held.get("over_refusal"),
            mean_answer_length=mean.get(version),
        )

    return CanaryEvidence(
        canary=canary,
        active_version=active,
        active=counts.get(active, ThumbCounts(0, 0)),
        candidate=counts.get(canary.version, ThumbCounts(0, 0)),
        active_summary=summary(active, "active"),
        canary_summary=summary(canary.version, "candidate"),
    )


def decide_canary(
    engine: Engine,
    config: RolloutConfig | None = None,
    guards: GuardConfig | None = None,
    *,
    act: bool = True,
) -> tuple[RolloutDecision, CanaryEvidence] | None:
    """The running canary's decision from its evidence so far (None: no canary). With
    ``act``, a promote or a rollback ends the canary (promoted to active, or rejected) with
    the decision and its evidence recorded; continue and the volume cap leave it running for
    an operator to decide."""
    canary = canary_of(engine)
    if canary is None:
        return None
    evidence = canary_evidence(engine, canary)
    vetoes = guard_vetoes(evidence.active_summary, evidence.canary_summary, guards)
    decision = decide_rollout(evidence.active, evidence.candidate, None, config, vetoes)
    if act and decision.decision in ("promote", "rollback"):
        record = {"by": "rollout", "reason": decision.reason, "evidence": _evidence(decision)}
        if decision.decision == "promote":
            promote_canary(engine, canary.version, record)
        else:
            abort_canary(engine, canary.version, record)
    return decision, evidence


def _evidence(decision: RolloutDecision) -> dict[str, Any]:
    return {
        "active": asdict(decision.active),
        "canary": asdict(decision.canary),
        "thumbs": asdict(decision.thumbs),
        "vetoes": [asdict(v) for v in decision.vetoes],
    }
