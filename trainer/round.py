"""The typed objects one trainer round passes along: what rank 0 planned (:class:`RoundPlan`),
what the round measured (:class:`RoundMetrics`) and what it did (:class:`RoundResult`).

Each has one JSON form: the plan's is sent to every rank; the metrics' is what the
``training_runs`` row, the candidate's manifest and :attr:`RoundResult.metrics` hold.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from trainer.feedback import FeedbackData, Pending
from trainer.gate import GateReport, GateTry
from trainer.reward import RewardReport


def finite(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as None (PostgreSQL's JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


@dataclass
class RoundPlan:
    """What rank 0 decided: skip (``skip`` says why) or train from ``base`` on ``data``."""

    new: int  # feedback items past the watermark
    base: str | None  # the active policy the round starts from
    skip: str = ""
    reference: str = ""  # the KL reference version
    run_id: int = 0  # the round's ``training_runs`` row
    kl_coef: float | None = None  # PPO's adaptive KL coefficient from the last round
    data: FeedbackData | None = None

    @property
    def go(self) -> bool:
        return not self.skip

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["data"] = self.data.to_json() if self.data is not None else None
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RoundPlan:
        data = raw.get("data")
        return cls(**{**raw, "data": FeedbackData.from_json(data) if data else None})


@dataclass
class FeedbackCounts:
    """The feedback a round saw: new items past the watermark and what it trained on."""

    new: int
    new_votes: int | None
    new_rankings: int | None
    pairs: int
    thumbs: int
    logged_prompts: int
    new_labels: int | None = None

    @classmethod
    def of(cls, plan: RoundPlan, data: FeedbackData, pend: Pending | None) -> FeedbackCounts:
        return cls(
            new=plan.new,
            new_votes=pend.n_feedback if pend else None,
            new_rankings=pend.n_rankings if pend else None,
            pairs=len(data.pairs),
            thumbs=len(data.thumbs),
            logged_prompts=len(data.prompts),
            new_labels=pend.n_labels if pend else None,
        )


@dataclass
class RoundMetrics:
    """What a trained round measured, phase by phase."""

    algo: str
    reference: str
    feedback: FeedbackCounts
    reward_model: RewardReport
    policy: dict[str, Any]  # the algorithm's report (trainer.algorithms)
    gate: GateReport
    step_fraction: float  # the share of the trained step that was gated last
    gate_tries: list[GateTry]
    seconds: dict[str, float]  # per phase

    def to_dict(self) -> dict[str, Any]:
        return finite(
            {
                "algo": self.algo,
                "reference": self.reference,
                "feedback": asdict(self.feedback),
                "reward_model": self.reward_model.to_dict(),
                "policy": self.policy,
                "gate": self.gate.to_dict(),
                "step_fraction": self.step_fraction,
                "gate_tries": [t.to_dict() for t in self.gate_tries],
                "seconds": dict(self.seconds),
            }
        )


@dataclass
class RoundResult:
    """What a round did. ``status``: published (the candidate is now active), rejected (the
    gate said no; reasons given), skipped (not enough feedback) or failed. ``metrics`` is
    :meth:`RoundMetrics.to_dict` (with ``reasons``), as the run's row holds it."""

    status: str
    run_id: int | None = None
    base_version: str | None = None
    candidate_version: str | None = None
    active_version: str | None = None
    reward_model_version: str | None = None
    n_feedback: int = 0  # new items this round consumed
    n_pairs: int = 0
    n_thumbs: int = 0
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RoundResult:
        return cls(**raw)

    @property
    def rm_accuracy(self) -> float | None:
        return self.metrics.get("reward_model", {}).get("heldout_accuracy")

    @property
    def rm_heldout_pairs(self) -> int | None:
        """How many held-out pairs :attr:`rm_accuracy` was measured on."""
        return self.metrics.get("reward_model", {}).get("heldout_pairs")

    @property
    def kl(self) -> float | None:
        return self.metrics.get("gate", {}).get("candidate", {}).get("kl")
