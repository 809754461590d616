"""The online RLHF loop: feedback in the database -> reward model -> better policy -> gate ->
publish and activate (the running servers hot-swap to it).

One round (:meth:`OnlineTrainer.run_round`):

1. read what is new past the watermark and the current feedback (:mod:`trainer.feedback`);
   record a ``training_runs`` row (status ``running``);
2. train a reward model from the active policy's trunk and save it as a versioned artifact;
3. improve a copy of the active policy with ``ppo``, ``dpo`` or ``kto`` against the frozen
   reference (the active policy when this database's trainer first ran, kept in
   ``trainer_state``);
4. gate the candidate against the active policy (:mod:`trainer.gate`); one that fails is
   tried again at a fraction of its step (weights interpolated towards the active policy);
5. publish the candidate to the registry (atomic), then in **one transaction**: activate it
   (or record it ``rejected``), finish the run row and advance the watermark.

Crash safety: the registry only ever shows whole versions; the active policy changes only in
the final transaction; the watermark moves only there too, so a trainer killed at any point
redoes the round after a restart. A run left ``running`` by a killed trainer is marked
``failed`` at the next start and its published-but-never-activated candidate ``rejected``.
``PALMCHAT_TRAINER_CRASH_AT=<point>`` kills the process at a named point (tests).

Runs alone or under ``torchrun`` (DDP): rank 0 reads the database, gates and publishes; the
training phases shard their data and all-reduce gradients across ranks. One trainer per
database.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.engine import Engine
from sqlmodel import select

from shared.checkpoints import PolicyRegistry
from shared.config import Settings
from shared.db import session
from shared.model import PaLM
from shared.policies import active_version, add_version_row
from shared.schema import Policy, TrainingRun, utcnow
from trainer.common import (
    DistInfo,
    barrier,
    broadcast_json,
    init_distributed,
    local_device,
    seed_everything,
)
from trainer.config import TrainerConfig
from trainer.feedback import (
    FeedbackData,
    Pending,
    Watermark,
    get_state,
    load_feedback,
    load_watermark,
    pending,
    save_watermark,
    set_state,
)
from trainer.metrics import TrainerMetrics

log = logging.getLogger(__name__)

CRASH_ENV = "PALMCHAT_TRAINER_CRASH_AT"
CRASH_POINTS = ("after_reward_model", "after_training", "after_publish", "before_commit")
REFERENCE_KEY, KL_COEF_KEY = "reference_version", "kl_coef"
Progress = Callable[[str, int, int, str], None]


def _finite(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as None (PostgreSQL's JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def crash_point(name: str) -> None:
    """Die here, without any clean-up, if ``$PALMCHAT_TRAINER_CRASH_AT`` names this point."""
    if os.environ.get(CRASH_ENV) == name:
        log.warning("crash point %s reached: exiting", name)
        os._exit(86)


@dataclass
class TrainerContext:
    """Where the trainer reads feedback and writes policies."""

    engine: Engine
    registry: PolicyRegistry
    reward_root: Path

    @classmethod
    def from_settings(cls, settings: Settings) -> TrainerContext:
        from shared.bootstrap import prepare

        prepared = prepare(settings)
        return cls(prepared.engine, prepared.registry, settings.data_dir / "reward_models")


@dataclass
class RoundResult:
    """What a round did. ``status``: published (the candidate is now active), rejected (the
    gate said no; reasons given), skipped (not enough feedback) or failed."""

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
        self._reference: tuple[str, PaLM] | None = None
        self._ref_logprobs: dict[tuple, float] = {}
        self._active_cache: tuple[str, dict[str, Any]] | None = None

    # -- state ------------------------------------------------------------------------------
    def pending(self) -> Pending:
        """New feedback past the watermark (rank 0's view)."""
        return pending(self.ctx.engine, load_watermark(self.ctx.engine), self.config.settle_seconds)

    def recover(self) -> list[int]:
        """Mark runs a killed trainer left ``running`` as failed; their never-activated
        candidates become ``rejected``. Returns the ids of those runs."""
        now = utcnow()
        with session(self.ctx.engine) as s:
            stale = s.exec(select(TrainingRun).where(TrainingRun.status == "running")).all()
            for run in stale:
                run.status, run.finished_at = "failed", now
                run.metrics = {**run.metrics, "error": "trainer stopped before the round ended"}
                s.add(run)
                version = run.candidate_version
                if version and s.get(Policy, version) is None:
                    # published by a trainer that died before recording it (older versions
                    # wrote the run and the row in two transactions)
                    add_version_row(s, self.ctx.registry, version, "candidate")
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

    def _load_reference(self, version: str) -> PaLM:
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
        plan: dict[str, Any]
        pend = None
        if self.info.is_main:
            self.recover()
            pend = self.pending()
            self.metrics.observe_pending(pend)
            plan = self._plan(pend, force)
        else:
            plan = {}
        plan = broadcast_json(plan, self.info, self.device)  # type: ignore[assignment]
        if not plan["go"]:
            result = RoundResult("skipped", reasons=[plan["reason"]], n_feedback=plan["new"])
            result.active_version = plan.get("base")
            result.seconds = time.monotonic() - t0
            self.metrics.observe_round(result)
            return result
        try:
            result = self._train(plan, pend, t0)
        except Exception as e:
            if self.info.is_main:
                self._fail_run(plan["run_id"], e)
                self.metrics.rounds.labels("failed").inc()
            raise
        self.metrics.observe_round(result)
        return result

    def _plan(self, pend: Pending, force: bool) -> dict[str, Any]:
        cfg = self.config
        base = active_version(self.ctx.engine)
        skip = {"go": False, "new": pend.total, "base": base}
        if not force and pend.total < cfg.min_new_feedback:
            return {**skip, "reason": f"{pend.total} new feedback items (< {cfg.min_new_feedback})"}
        if base is None:
            return {**skip, "reason": "no active policy"}
        data = load_feedback(
            self.ctx.engine,
            max_items=cfg.max_train_items,
            margin=cfg.rm_margin,
            max_pairs_per_prompt=cfg.rm_max_pairs_per_prompt,
            seed=cfg.seed,
        )
        if not data.pairs and not data.thumbs:
            return {**skip, "reason": "no feedback to learn from"}
        if cfg.algo == "dpo" and not data.pairs:
            return {**skip, "reason": "dpo needs preference pairs; there are none yet"}
        if cfg.algo == "kto" and not data.thumbs:
            return {**skip, "reason": "kto needs thumbs; there are none yet"}
        reference = self._reference_version(base)
        first_round = get_state(self.ctx.engine, REFERENCE_KEY) is None
        with session(self.ctx.engine) as s:
            if first_round:
                set_state(s, REFERENCE_KEY, reference)
            run = TrainingRun(
                algo=cfg.algo,
                base_version=base,
                n_feedback=pend.total,
                feedback_watermark=pend.watermark.feedback_id,
                metrics={"watermark_to": pend.watermark.to_json(), "reference": reference},
            )
            s.add(run)
            s.flush()
            run_id = run.id
        kl_coef = get_state(self.ctx.engine, KL_COEF_KEY)
        return {
            "go": True,
            "new": pend.total,
            "base": base,
            "reference": reference,
            "run_id": run_id,
            "kl_coef": kl_coef,
            "data": data.to_json(),
        }

    def _phase(self, name: str, done: int, total: int, info: str = "") -> None:
        if self.progress is not None and self.info.is_main:
            self.progress(name, done, total, info)

    def _train(self, plan: dict[str, Any], pend: Pending | None, t0: float) -> RoundResult:
        from trainer.dpo import reward_ranked_pairs, train_dpo, train_kto
        from trainer.gate import gate_with_backtracking
        from trainer.ppo import make_kl_controller, train_ppo
        from trainer.reward import train_reward_model

        cfg, info = self.config, self.info
        run_id, base = int(plan["run_id"]), plan["base"]
        seed = cfg.seed * 1009 + run_id
        seed_everything(seed)
        data = FeedbackData.from_json(plan["data"])
        train, held = data.split(cfg.rm_heldout_percent)
        active = self.ctx.registry.load(base, device=self.device)
        tok = active.tokenizer
        reference = self._load_reference(plan["reference"])
        seconds: dict[str, float] = {}
        phase = self._phase if info.is_main else None

        t = time.monotonic()
        init, init_name = self._previous_reward_model(active.model, tok)
        rm, rm_report = train_reward_model(
            active.model,
            tok,
            train,
            held,
            epochs=cfg.rm_epochs,
            max_steps=cfg.rm_max_steps,
            init=init,
            init_name=init_name,
            lr=cfg.rm_lr,
            batch_size=cfg.rm_batch_size,
            pointwise_weight=cfg.rm_pointwise_weight,
            lm_weight=cfg.rm_lm_weight,
            max_len=cfg.rm_max_length,
            lora_rank=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            grad_clip=cfg.grad_clip,
            weight_decay=cfg.weight_decay,
            seed=seed,
            info=info,
            progress=phase,
        )
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
        if cfg.pref_reference == "active":
            pref_ref, pref_cache = active.model, {}
        else:
            pref_ref, pref_cache = reference, self._ref_logprobs
        kl_ctl = None
        if cfg.algo == "ppo":
            kl_ctl = make_kl_controller(cfg, plan.get("kl_coef"))
            prompts = self._ppo_prompts(data, seed)
            report = train_ppo(
                policy,
                reference,
                rm,
                tok,
                prompts,
                cfg,
                kl_controller=kl_ctl,
                info=info,
                progress=phase,
                seed=seed,
            ).to_dict()
        elif cfg.algo == "dpo":
            pairs = list(data.pairs)
            rm_pairs = 0
            if cfg.dpo_rm_prompts:
                self._phase("on-policy pairs", 0, 1, f"{cfg.dpo_rm_prompts} prompts")
                pool = self._ppo_prompts(data, seed)
                rng = random.Random(seed)
                asked = [pool[rng.randrange(len(pool))] for _ in range(cfg.dpo_rm_prompts)]
                extra = reward_ranked_pairs(active.model, rm, tok, asked, cfg, seed=seed)
                rm_pairs = len(extra)
                pairs += extra
                self._phase("on-policy pairs", 1, 1, f"{rm_pairs} pairs")
            report = train_dpo(
                policy,
                pref_ref,
                tok,
                pairs,
                cfg,
                info=info,
                progress=phase,
                seed=seed,
                ref_cache=pref_cache,
            ).to_dict()
            report["logged_pairs"], report["reward_model_pairs"] = len(data.pairs), rm_pairs
        else:
            report = train_kto(
                policy,
                pref_ref,
                tok,
                data.thumbs,
                cfg,
                info=info,
                progress=phase,
                seed=seed,
                ref_cache=pref_cache,
            ).to_dict()
        seconds["policy"] = time.monotonic() - t
        crash_point("after_training")

        result: dict[str, Any] = {}
        if info.is_main:
            t = time.monotonic()
            self._phase("gate", 0, 1, "sampling held-out replies")
            cache = (
                self._active_cache[1]
                if self._active_cache and self._active_cache[0] == base
                else None
            )
            policy, fraction, gate, tries, act_cache = gate_with_backtracking(
                policy.eval(), active.model, reference, rm, tok, cfg, active_cache=cache
            )
            self._active_cache = (base, act_cache)
            verdict = f"passed at step {fraction:g}" if gate.passed else "rejected"
            self._phase("gate", 1, 1, f"{verdict} ({len(tries)} tries)")
            seconds["gate"] = time.monotonic() - t
            metrics = {
                "algo": cfg.algo,
                "reference": plan["reference"],
                "feedback": {
                    "new": plan["new"],
                    "new_votes": pend.n_feedback if pend else None,
                    "new_rankings": pend.n_rankings if pend else None,
                    "pairs": len(data.pairs),
                    "thumbs": len(data.thumbs),
                    "logged_prompts": len(data.prompts),
                },
                "reward_model": rm_report.to_dict(),
                "policy": report,
                "gate": gate.to_dict(),
                "step_fraction": fraction,
                "gate_tries": tries,
                "seconds": seconds,
            }
            result = self._commit(
                run_id,
                base,
                policy,
                tok,
                gate,
                _finite(metrics),
                pend,
                kl_ctl.value if kl_ctl else None,
            )
            result["seconds"] = time.monotonic() - t0
            result["metrics"]["seconds"]["total"] = result["seconds"]
        result = broadcast_json(result, info, self.device)  # type: ignore[assignment]
        return RoundResult(**result)

    def _previous_reward_model(self, policy: PaLM, tok: Any) -> tuple[Any, str]:
        """The last round's reward model to continue from (``rm_init="previous"``), if it
        fits this policy's architecture and tokenizer; else (None, "policy")."""
        version = self.rewards.latest() if self.config.rm_init == "previous" else None
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

    def _ppo_prompts(self, data: FeedbackData, seed: int) -> list[list[dict[str, str]]]:
        from demo.tasks import TaskGenerator

        pool = max(256, self.config.ppo_rollouts * 4)
        n_log = min(len(data.prompts), int(pool * self.config.log_prompt_fraction))
        rng = random.Random(seed)
        logged = rng.sample(data.prompts, n_log) if n_log else []
        synthetic = [
            t.messages for t in TaskGenerator(seed).iter_tasks(pool - n_log, split="train")
        ]
        return logged + synthetic

    def _commit(
        self,
        run_id: int,
        base: str,
        policy: PaLM,
        tok: Any,
        gate: Any,
        metrics: dict[str, Any],
        pend: Pending | None,
        kl_coef: float | None,
    ) -> dict[str, Any]:
        """Publish and record the outcome; the activation, the run row and the watermark
        change together in one transaction."""
        cfg, engine, registry = self.config, self.ctx.engine, self.ctx.registry
        reasons = list(gate.reasons)
        now_active = active_version(engine)
        if now_active != base:
            reasons.append(f"the active policy changed during the round ({base} -> {now_active})")
        passed = not reasons
        version = None
        if passed or cfg.publish_rejected:
            self._phase("publish", 0, 1, "writing the registry")
            version = registry.publish(
                policy.float().cpu(),
                tok,
                parent=base,
                metrics={
                    **metrics,
                    "status": "active" if passed else "rejected",
                    "reasons": reasons,
                },
                recipe={
                    "trainer": cfg.to_dict(),
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
        watermark = pend.watermark if pend is not None else Watermark()
        with session(engine) as s:
            now = utcnow()
            if passed:
                for row in s.exec(select(Policy).where(Policy.status == "active")).all():
                    if row.version != version:
                        row.status, row.retired_at = "retired", now
                        s.add(row)
                target = s.get(Policy, version)
                assert target is not None  # its row was added with the run above
                target.status, target.activated_at, target.retired_at = "active", now, None
                s.add(target)
            run = s.get(TrainingRun, run_id)
            assert run is not None  # written when the round began
            run.status = "published" if passed else "rejected"
            run.finished_at = now
            run.candidate_version = version
            run.feedback_watermark = watermark.feedback_id
            run.metrics = {**run.metrics, **metrics, "reasons": reasons}
            s.add(run)
            save_watermark(s, watermark)
            if kl_coef is not None:
                set_state(s, KL_COEF_KEY, kl_coef)
        self._phase(
            "publish", 1, 1, f"{version or 'not published'} {'active' if passed else 'rejected'}"
        )
        if passed:
            log.info("round %d: %s published and active (parent %s)", run_id, version, base)
        else:
            log.info("round %d: candidate %s rejected: %s", run_id, version, "; ".join(reasons))
        return {
            "status": "published" if passed else "rejected",
            "run_id": run_id,
            "base_version": base,
            "candidate_version": version,
            "active_version": version if passed else now_active,
            "reward_model_version": metrics["reward_model"].get("version"),
            "n_feedback": metrics["feedback"]["new"],
            "n_pairs": metrics["feedback"]["pairs"],
            "n_thumbs": metrics["feedback"]["thumbs"],
            "reasons": reasons,
            "metrics": metrics,
        }

    def _fail_run(self, run_id: int | None, error: BaseException) -> None:
        if run_id is None:
            return
        try:
            with session(self.ctx.engine) as s:
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

    # -- the loop ---------------------------------------------------------------------------
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
