"""The online RLHF loop: feedback in the database -> reward model -> better policy -> gate ->
publish and activate (the running servers hot-swap to it).

One round (:meth:`OnlineTrainer.run_round`):

1. read what is new past the watermark and the current feedback (:mod:`trainer.feedback`);
   record a ``training_runs`` row (status ``running``): a :class:`~trainer.round.RoundPlan`;
2. train a reward model from the active policy's trunk and save it as a versioned artifact;
3. improve a copy of the active policy with one of :data:`trainer.algorithms.ALGORITHMS`
   (``ppo``, ``dpo`` or ``kto``) against the frozen reference (the active policy when this
   database's trainer first ran, kept in ``trainer_state``);
4. gate the candidate against the active policy (:mod:`trainer.gate`); one that fails is
   tried again at a fraction of its step (weights interpolated towards the active policy);
5. publish the candidate to the registry (atomic), then in **one transaction** activate it
   (or record it ``rejected``), finish the run row and advance the watermark
   (:mod:`trainer.runs`, which also says how a killed trainer recovers).

Runs alone or under ``torchrun`` (DDP): rank 0 reads the database, gates and publishes; the
training phases shard their data and all-reduce gradients across ranks. One trainer per
database.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from shared.config import Settings
from shared.families import PolicyModel
from shared.policies import active_version
from shared.rollout.live import decide_canary
from shared.tokenizer import Tokenizer
from trainer.algorithms import ALGORITHMS, PolicyUpdate
from trainer.common import (
    DistInfo,
    Progress,
    barrier,
    broadcast_json,
    init_distributed,
    local_device,
    seed_everything,
)
from trainer.config import TrainerConfig
from trainer.context import TrainerContext, crash_point
from trainer.feedback import (
    FeedbackData,
    Pending,
    get_state,
    load_feedback,
    load_watermark,
    pending,
)
from trainer.gate import GateJob, gate_with_backtracking
from trainer.metrics import TrainerMetrics
from trainer.reward import RewardModel, RewardReport, train_reward_model
from trainer.round import FeedbackCounts, RoundMetrics, RoundPlan, RoundResult
from trainer.runs import (
    KL_COEF_KEY,
    REFERENCE_KEY,
    commit_round,
    fail_run,
    recover_stale_runs,
    start_run,
)

log = logging.getLogger(__name__)

__all__ = ["OnlineTrainer", "RoundResult", "TrainerContext", "run_round"]


class OnlineTrainer:
    """The trainer process's state between rounds (cached reference model, the active
    policy's gate evaluation, metrics)."""

    def __init__(
        self,
        context: TrainerContext | Settings,
        config: TrainerConfig | None = None,
        *,
        progress: Progress | None = None,
        metrics: TrainerMetrics | None = None,
        info: DistInfo | None = None,
    ) -> None:
        self.config = config or TrainerConfig()
        self.info = info or init_distributed(self.config.device)
        if isinstance(context, Settings):
            if not self.info.is_main:
                barrier(self.info)  # rank 0 migrates and installs the seed first
            context = TrainerContext.from_settings(context)
            if self.info.is_main:
                barrier(self.info)
        self.ctx = context
        self.progress = progress
        self.metrics = metrics or TrainerMetrics()
        self.device = local_device(self.config.device, self.info)
        cores = len(os.sched_getaffinity(0))
        if self.device == "cpu":
            torch.set_num_threads(self.config.threads or max(1, cores // self.info.world))
        from trainer.reward import RewardRegistry

        self.rewards = RewardRegistry(self.ctx.reward_root)
        self._reference: tuple[str, PolicyModel] | None = None
        self._ref_logprobs: dict[tuple, float] = {}
        self._active_cache: tuple[str, dict[str, Any]] | None = None
        self._reference_hits: tuple[str, list[bool]] | None = None  # the KL reference's

    # -- state ------------------------------------------------------------------------------
    def pending(self) -> Pending:
        """New feedback past the watermark (rank 0's view)."""
        return pending(self.ctx.engine, load_watermark(self.ctx.engine), self.config.settle_seconds)

    def recover(self) -> list[int]:
        """See :func:`trainer.runs.recover_stale_runs`."""
        return recover_stale_runs(self.ctx)

    def _reference_version(self, base: str) -> str:
        choice = self.config.reference
        if choice == "active":
            return base
        if choice != "first":
            return str(choice)
        stored = get_state(self.ctx.engine, REFERENCE_KEY)
        if stored and stored in self.ctx.registry.versions():
            return stored
        return base

    def _load_reference(self, version: str) -> PolicyModel:
        if self._reference is None or self._reference[0] != version:
            model = self.ctx.registry.load(version, device=self.device).model
            self._reference = (version, model.eval().requires_grad_(False))
            self._ref_logprobs = {}  # reference log-probs of logged replies, per reference
        return self._reference[1]

    # -- one round --------------------------------------------------------------------------
    def run_round(self, force: bool = False) -> RoundResult:
        """Train, gate and publish once. Without ``force``, a round needs at least
        ``min_new_feedback`` new items; with it, any feedback in the database will do."""
        t0 = time.monotonic()
        pend = None
        raw: dict[str, Any] = {}
        if self.info.is_main:
            self.recover()
            pend = self.pending()
            self.metrics.observe_pending(pend)
            raw = self._plan(pend, force).to_json()
        plan = RoundPlan.from_json(broadcast_json(raw, self.info, self.device))  # type: ignore[arg-type]
        if not plan.go:
            result = RoundResult("skipped", reasons=[plan.skip], n_feedback=plan.new)
            result.active_version = plan.base
            result.seconds = time.monotonic() - t0
            self.metrics.observe_round(result)
            return result
        try:
            result = self._train(plan, pend, t0)
        except Exception as e:
            if self.info.is_main:
                fail_run(self.ctx, plan.run_id, e)
                self.metrics.rounds.labels("failed").inc()
            raise
        self.metrics.observe_round(result)
        return result

    def _plan(self, pend: Pending, force: bool) -> RoundPlan:
        cfg = self.config
        base = active_version(self.ctx.engine)
        if not force and pend.total < cfg.min_new_feedback:
            why = f"{pend.total} new feedback items (< {cfg.min_new_feedback})"
            return RoundPlan(pend.total, base, skip=why)
        if base is None:
            return RoundPlan(pend.total, base, skip="no active policy")
        data = load_feedback(
            self.ctx.engine,
            max_items=cfg.max_train_items,
            margin=cfg.reward.margin,
            max_pairs_per_prompt=cfg.reward.max_pairs_per_prompt,
            seed=cfg.seed,
            refusals_per_prompt=cfg.refusal_pairs,
            ignore_users=cfg.ignore_users,
        )
        if not data.pairs and not data.thumbs:
            return RoundPlan(pend.total, base, skip="no feedback to learn from")
        missing = ALGORITHMS[cfg.algo].missing(data)
        if missing:
            return RoundPlan(pend.total, base, skip=missing)
        reference = self._reference_version(base)
        run_id = start_run(self.ctx, cfg.algo, base, reference, pend.total, pend.watermark)
        kl_coef = get_state(self.ctx.engine, KL_COEF_KEY)
        return RoundPlan(pend.total, base, "", reference, run_id, kl_coef, data)

    def _phase(self, name: str, done: int, total: int, info: str = "") -> None:
        if self.progress is not None and self.info.is_main:
            self.progress(name, done, total, info)

    def _train(self, plan: RoundPlan, pend: Pending | None, t0: float) -> RoundResult:
        cfg, info = self.config, self.info
        assert plan.base is not None and plan.data is not None  # a round that trains has both
        base, data = plan.base, plan.data
        seed = cfg.seed * 1009 + plan.run_id
        seed_everything(seed)
        active = self.ctx.registry.load(base, device=self.device)
        # the rank resolved for this policy's size, so the round's recipe records what ran
        rank = cfg.lora_rank_for(active.model.num_params())
        if rank != cfg.lora_rank:
            cfg = cfg.replace(lora_rank=rank)
        tok = active.tokenizer
        reference = self._load_reference(plan.reference)
        seconds: dict[str, float] = {}
        phase = self._phase if info.is_main else None

        t = time.monotonic()
        rm, rm_report = self._reward_model(active.model, tok, data, seed, phase, cfg)
        seconds["reward_model"] = time.monotonic() - t
        if info.is_main:
            rm_report.version = self.rewards.publish(
                rm, tok, policy_version=base, metrics=rm_report.to_dict()
            )
            log.info("reward model %s: %s", rm_report.version, rm_report.to_dict())
        crash_point("after_reward_model")

        t = time.monotonic()
        policy = copy.deepcopy(active.model).float().train().requires_grad_(True)
        # DPO/KTO log-ratios: against this round's starting policy (its log-probs are new each
        # round) or against the loop's KL reference (memoised across rounds)
        if cfg.preference.reference == "active":
            pref_ref, pref_cache = active.model, {}
        else:
            pref_ref, pref_cache = reference, self._ref_logprobs
        update = PolicyUpdate(
            policy, active.model, reference, pref_ref, pref_cache, rm, tok, data, cfg, info,
            seed, kl_coef=plan.kl_coef, progress=phase,
        )  # fmt: skip
        outcome = ALGORITHMS[cfg.algo].train(update)
        seconds["policy"] = time.monotonic() - t
        crash_point("after_training")

        raw: dict[str, Any] = {}
        if info.is_main:
            t = time.monotonic()
            self._phase("gate", 0, 1, "sampling held-out replies")
            cache = (
                self._active_cache[1]
                if self._active_cache and self._active_cache[0] == base
                else None
            )
            ref_hits = (
                self._reference_hits[1]
                if self._reference_hits and self._reference_hits[0] == plan.reference
                else None
            )
            job = GateJob(
                active.model,
                reference,
                rm,
                tok,
                cfg,
                active_cache=cache,
                reference_hits=ref_hits,
                reference_is_active=plan.reference == base,
            )
            gated = gate_with_backtracking(job, policy.eval())
            self._active_cache = (base, gated.active_cache)
            if gated.active_cache.get("reference_hits") is not None:
                self._reference_hits = (plan.reference, gated.active_cache["reference_hits"])
            verdict = f"passed at step {gated.step_fraction:g}" if gated.passed else "rejected"
            self._phase("gate", 1, 1, f"{verdict} ({len(gated.tries)} tries)")
            seconds["gate"] = time.monotonic() - t
            metrics = RoundMetrics(
                algo=cfg.algo,
                reference=plan.reference,
                feedback=FeedbackCounts.of(plan, data, pend),
                reward_model=rm_report,
                policy=outcome.report,
                gate=gated.report,
                step_fraction=gated.step_fraction,
                gate_tries=gated.tries,
                seconds=seconds,
            )
            assert pend is not None  # rank 0 read it
            result = commit_round(
                self.ctx,
                cfg,
                run_id=plan.run_id,
                base=base,
                policy=gated.policy,
                tok=tok,
                gate_reasons=gated.report.reasons,
                metrics=metrics.to_dict(),
                watermark=pend.watermark,
                kl_coef=outcome.kl_coef,
                phase=self._phase,
            )
            result.seconds = time.monotonic() - t0
            result.metrics["seconds"]["total"] = result.seconds
            raw = result.to_dict()
        return RoundResult.from_dict(broadcast_json(raw, info, self.device))  # type: ignore[arg-type]

    def _reward_model(
        self,
        policy: PolicyModel,
        tok: Tokenizer,
        data: FeedbackData,
        seed: int,
        progress: Progress | None,
        cfg: TrainerConfig,
    ) -> tuple[RewardModel, RewardReport]:
        """This round's reward model, trained on ``data`` minus its held-out prompts."""
        rc = cfg.reward
        train, held = data.split(rc.heldout_percent)
        init, init_name = self._previous_reward_model(policy, tok)
        return train_reward_model(
            policy,
            tok,
            train,
            held,
            epochs=rc.epochs,
            max_steps=rc.max_steps,
            init=init,
            init_name=init_name,
            lr=rc.lr,
            batch_size=rc.batch_size,
            pointwise_weight=rc.pointwise_weight,
            lm_weight=rc.lm_weight,
            max_len=rc.max_length,
            lora_rank=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            grad_clip=cfg.grad_clip,
            weight_decay=cfg.weight_decay,
            seed=seed,
            info=self.info,
            progress=progress,
        )

    def _previous_reward_model(self, policy: PolicyModel, tok: Tokenizer) -> tuple[Any, str]:
        """The last round's reward model to continue from (``rm_init="previous"``), if it
        fits this policy's architecture and tokenizer; else (None, "policy")."""
        version = self.rewards.latest() if self.config.reward.init == "previous" else None
        if version is None:
            return None, "policy"
        try:
            rm, rm_tok, _ = self.rewards.load(version, device=self.device)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            log.warning("cannot continue from reward model %s (%s); starting afresh", version, e)
            return None, "policy"
        if rm.trunk.config != policy.config or rm_tok.vocab_size != tok.vocab_size:
            return None, "policy"
        return rm, version

    # -- the loop ---------------------------------------------------------------------------
    def decide_canary(self) -> None:
        """With ``rollout=canary``: promote or roll back the running canary once its live
        evidence decides (:func:`shared.rollout.live.decide_canary`)."""
        if self.config.rollout != "canary":
            return
        try:
            decided = decide_canary(self.ctx.engine)
        except Exception:  # a database hiccup: decided at the next poll
            log.exception("canary decision failed; retrying at the next poll")
            return
        if decided is not None and decided[0].decision in ("promote", "rollback"):
            decision, evidence = decided
            log.info(
                "canary %s: %s (%s)", evidence.canary.version, decision.decision, decision.reason
            )
            self.metrics.observe_canary_decision(decision.decision)

    def watch(
        self,
        *,
        max_rounds: int | None = None,
        stop: threading.Event | None = None,
        on_round: Callable[[RoundResult], None] | None = None,
    ) -> list[RoundResult]:
        """Poll every ``poll_seconds``; run a round whenever ``min_new_feedback`` new items
        have arrived. Returns after ``max_rounds`` rounds or when ``stop`` is set. A failing
        round is logged and retried at the next poll (under torchrun it ends the loop)."""
        results: list[RoundResult] = []
        stop = stop or threading.Event()
        while True:
            decision = {"stop": stop.is_set(), "go": False}
            if self.info.is_main and not decision["stop"]:
                self.decide_canary()
                pend = self.pending()
                self.metrics.observe_pending(pend)
                decision["go"] = pend.total >= self.config.min_new_feedback
            decision = broadcast_json(decision, self.info, self.device)  # type: ignore[assignment]
            if decision["stop"]:
                return results
            if decision["go"]:
                try:
                    result = self.run_round(force=True)
                except Exception:
                    if self.info.enabled:
                        raise
                    log.exception("trainer round failed; retrying at the next poll")
                    stop.wait(self.config.poll_seconds)
                    continue
                results.append(result)
                if on_round is not None and self.info.is_main:
                    on_round(result)
                if max_rounds is not None and len(results) >= max_rounds:
                    return results
                continue
            stop.wait(self.config.poll_seconds)


def run_round(
    context: TrainerContext | Settings,
    config: TrainerConfig | None = None,
    *,
    force: bool = True,
    progress: Progress | None = None,
) -> RoundResult:
    """One round with a fresh trainer (see :meth:`OnlineTrainer.run_round`)."""
    return OnlineTrainer(context, config, progress=progress).run_round(force=force)
