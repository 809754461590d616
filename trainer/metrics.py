"""Prometheus metrics of the trainer, served on their own port (``--metrics-port``).

A private ``CollectorRegistry`` keeps them apart from the server's metrics when both run in
one process (tests, the demo).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, start_http_server

if TYPE_CHECKING:
    from trainer.feedback import Pending
    from trainer.round import RoundResult


class TrainerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"palmchat_trainer_{name}", doc, registry=r)

        self.rounds = Counter(
            "palmchat_trainer_rounds",
            "Finished trainer rounds by outcome.",
            ["outcome"],
            registry=r,
        )
        self.reward_mean = gauge(
            "reward_mean", "Mean reward-model score of PPO rollouts / gate samples."
        )
        self.rm_accuracy = gauge("rm_accuracy", "Reward model held-out pairwise accuracy.")
        self.kl = gauge("kl", "KL(candidate || reference) per reply, nats.")
        self.kl_coef = gauge("kl_coef", "Current KL penalty coefficient (PPO).")
        self.policy_loss = gauge("policy_loss", "Last policy loss (PPO, DPO or KTO).")
        self.value_loss = gauge("value_loss", "Last PPO value loss.")
        self.round_seconds = gauge("round_seconds", "Duration of the last round.")
        self.last_publish = gauge(
            "last_publish_timestamp_seconds", "Unix time of the last activated version."
        )
        self.last_round = gauge("last_round_timestamp_seconds", "Unix time of the last round.")
        self.pending = gauge("pending_feedback", "Feedback items past the watermark.")
        self.lag = gauge(
            "feedback_lag_seconds", "Age of the oldest feedback item not yet trained on."
        )
        self.active_version = gauge("active_version", "Number N of the active policy vN.")
        self.canary_decisions = Counter(
            "palmchat_trainer_canary_decisions",
            "Canary rollouts ended by their live evidence, by decision (promote, rollback).",
            ["decision"],
            registry=r,
        )
        for decision in ("promote", "rollback"):  # exposed from the start, so rates are 0
            self.canary_decisions.labels(decision)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        start_http_server(port, addr=addr, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_pending(self, pending: Pending) -> None:
        from shared.schema import utcnow

        self.pending.set(pending.total)
        lag = (utcnow() - pending.oldest_at).total_seconds() if pending.oldest_at else 0.0
        self.lag.set(max(lag, 0.0))

    def observe_canary_decision(self, decision: str) -> None:
        self.canary_decisions.labels(decision).inc()

    def observe_round(self, result: RoundResult) -> None:
        self.rounds.labels(result.status).inc()
        self.last_round.set(time.time())
        if result.status == "skipped":
            return
        self.round_seconds.set(result.seconds)
        m = result.metrics
        rm = m.get("reward_model", {})
        if rm.get("heldout_accuracy") is not None:
            self.rm_accuracy.set(rm["heldout_accuracy"])
        gate = m.get("gate", {})
        cand = gate.get("candidate", {})
        if cand.get("kl") is not None:
            self.kl.set(cand["kl"])
        if cand.get("reward") is not None:
            self.reward_mean.set(cand["reward"])
        pol = m.get("policy", {})
        for key, gauge in (
            ("policy_loss", self.policy_loss),
            ("value_loss", self.value_loss),
            ("kl_coef", self.kl_coef),
        ):
            if pol.get(key) is not None:
                gauge.set(pol[key])
        if pol.get("loss_last") is not None:
            self.policy_loss.set(pol["loss_last"])
        if result.status == "published":
            self.last_publish.set(time.time())
        if result.active_version and result.active_version[1:].isdigit():
            self.active_version.set(int(result.active_version[1:]))
