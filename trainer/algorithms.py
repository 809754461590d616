"""The policy updates a round can run, in one table (:data:`ALGORITHMS`): each names the
feedback it cannot do without and how it trains a copy of the active policy in place."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from shared.families import PolicyModel
from shared.feedback_reader import Pair, Thumb
from shared.tokenizer import Tokenizer
from trainer.common import ChatMessages, DistInfo, Progress
from trainer.config import ALGOS, TrainerConfig
from trainer.dpo import PreferenceJob, reward_ranked_pairs, train_dpo, train_kto
from trainer.feedback import FeedbackData
from trainer.ppo import make_kl_controller, train_ppo
from trainer.reward import RewardModel


@dataclass
class PolicyUpdate:
    """What a policy update reads; ``policy`` (a copy of ``active``) is trained in place."""

    policy: PolicyModel
    active: PolicyModel
    reference: PolicyModel  # the loop's KL reference (PPO)
    preference_reference: PolicyModel  # what DPO/KTO log-ratios are measured against
    reference_cache: dict[tuple, float]  # memoised log-probs under preference_reference
    reward_model: RewardModel
    tok: Tokenizer
    data: FeedbackData
    config: TrainerConfig
    info: DistInfo
    seed: int
    kl_coef: float | None = None  # PPO's adaptive coefficient as the last round left it
    progress: Progress | None = None  # rank 0 only

    def phase(self, name: str, done: int, total: int, info: str = "") -> None:
        if self.progress is not None:
            self.progress(name, done, total, info)

    def preference_job(self) -> PreferenceJob:
        """DPO/KTO's view: ``policy`` against the preference reference and its cache."""
        return PreferenceJob(
            self.policy,
            self.preference_reference,
            self.tok,
            self.config,
            info=self.info,
            progress=self.progress,
            seed=self.seed,
            ref_cache=self.reference_cache,
        )


@dataclass
class PolicyOutcome:
    report: dict[str, Any]  # kept in the round's metrics as ``policy``
    kl_coef: float | None = None  # PPO's coefficient for the next round


@dataclass(frozen=True)
class Algorithm:
    name: str
    train: Callable[[PolicyUpdate], PolicyOutcome]
    needs: tuple[str, str] | None = None  # (FeedbackData field, its name in a message)

    def missing(self, data: FeedbackData) -> str | None:
        """Why ``data`` cannot train this algorithm (None: it can)."""
        if self.needs is None or getattr(data, self.needs[0]):
            return None
        return f"{self.name} needs {self.needs[1]}; there are none yet"


def rollout_prompts(data: FeedbackData, config: TrainerConfig, seed: int) -> list[ChatMessages]:
    """Prompts to sample the policy on: logged ones (``log_prompt_fraction``), the rest
    synthetic training tasks."""
    from demo.tasks import TaskGenerator

    pool = max(256, config.ppo.rollouts * 4)
    n_log = min(len(data.prompts), int(pool * config.ppo.log_prompt_fraction))
    rng = random.Random(seed)
    logged = rng.sample(data.prompts, n_log) if n_log else []
    synthetic = [t.messages for t in TaskGenerator(seed).iter_tasks(pool - n_log, split="train")]
    return logged + synthetic


def _ppo(u: PolicyUpdate) -> PolicyOutcome:
    kl_ctl = make_kl_controller(u.config, u.kl_coef)
    report = train_ppo(
        u.policy,
        u.reference,
        u.reward_model,
        u.tok,
        rollout_prompts(u.data, u.config, u.seed),
        u.config,
        kl_controller=kl_ctl,
        info=u.info,
        progress=u.progress,
        seed=u.seed,
    )
    return PolicyOutcome(report.to_dict(), kl_ctl.value)


def _dpo(u: PolicyUpdate) -> PolicyOutcome:
    asked_n = u.config.preference.dpo_rm_prompts
    pairs = list(u.data.pairs)
    rm_pairs = 0
    if asked_n:
        u.phase("on-policy pairs", 0, 1, f"{asked_n} prompts")
        pool = rollout_prompts(u.data, u.config, u.seed)
        rng = random.Random(u.seed)
        asked = [pool[rng.randrange(len(pool))] for _ in range(asked_n)]
        extra = reward_ranked_pairs(u.active, u.reward_model, u.tok, asked, u.config, seed=u.seed)
        rm_pairs = len(extra)
        pairs += extra
        u.phase("on-policy pairs", 1, 1, f"{rm_pairs} pairs")
    report = train_dpo(u.preference_job(), pairs).to_dict()
    report["logged_pairs"], report["reward_model_pairs"] = len(u.data.pairs), rm_pairs
    return PolicyOutcome(report)


def _kto(u: PolicyUpdate) -> PolicyOutcome:
    thumbs = [*u.data.thumbs, *refusal_thumbs(u.data.pairs, u.data.thumbs)]
    report = train_kto(u.preference_job(), thumbs).to_dict()
    report["refusal_thumbs"] = len(thumbs) - len(u.data.thumbs)
    return PolicyOutcome(report)


def refusal_thumbs(pairs: Sequence[Pair], thumbs: Sequence[Thumb] = ()) -> list[Thumb]:
    """KTO's view of the trainer's refusal pairs: each pair's chosen reply desirable and its
    rejected one undesirable (the refusal to a flagged request, the answer to a benign one);
    a reply in several pairs counts once, and one a user rated keeps only the user's thumb."""
    rated = {(json.dumps(t.prompt, sort_keys=True), t.reply) for t in thumbs}
    seen: dict[tuple[str, str], Thumb] = {}
    for p in pairs:
        if p.source != "refusal":
            continue
        prompt = json.dumps(p.prompt, sort_keys=True)
        for reply, label in ((p.chosen, 1), (p.rejected, -1)):
            if (prompt, reply) not in rated:
                seen.setdefault((prompt, reply), Thumb(p.prompt, reply, label))
    return list(seen.values())


ALGORITHMS: dict[str, Algorithm] = {
    "ppo": Algorithm("ppo", _ppo),
    "dpo": Algorithm("dpo", _dpo, needs=("pairs", "preference pairs")),
    "kto": Algorithm("kto", _kto, needs=("thumbs", "thumbs")),
}
assert tuple(ALGORITHMS) == ALGOS, "trainer.config.ALGOS names the table's algorithms"
