"""Configuration of the online RLHF trainer (``palmchat trainer``).

:class:`TrainerConfig` holds every knob of a round: the loop's own, and one section each for the
reward model, PPO, DPO/KTO and the promotion gate, passed whole to the code that uses it. The
defaults are sized for the ~4M-parameter seed policy on a 2-core CPU; PPO values follow trlx's
PPO config where they make sense at this scale.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

ALGOS: tuple[str, ...] = ("ppo", "dpo", "kto")
PARALLEL: tuple[str, ...] = ("ddp", "fsdp")


def _check(section: Any, names: tuple[str, ...], ok: Callable[[Any], bool], rule: str) -> None:
    """Raise ValueError naming the flat field (what ``--set`` takes) of the first bad value."""
    for name in names:
        value = getattr(section, name)
        if not ok(value):
            flat = flat_name(type(section), name)
            raise ValueError(f"TrainerConfig.{flat} must be {rule}, got {value}")


def flat_name(section: Any, name: str) -> str:
    """A section field's flat name: the section's prefix + the field, unless it is bare."""
    return name if name in section.BARE else section.PREFIX + name


@dataclass(slots=True)
class RewardConfig:
    """The reward model (flat names ``rm_*``)."""

    PREFIX: ClassVar[str] = "rm_"
    BARE: ClassVar[frozenset[str]] = frozenset()

    init: str = "previous"  # previous: continue from the last round's reward model; policy
    epochs: int = 4
    max_steps: int = 48
    lr: float = 1e-4
    batch_size: int = 16  # pairs per step
    margin: float = 0.0  # BT margin per rank of distance (0 = plain Bradley-Terry)
    pointwise_weight: float = 0.5  # weight of the thumbs (BCE) term
    # + lm_weight * log-likelihood of the reply under the trunk's LM head (learned from this
    # start, at its own rate, reward.LM_WEIGHT_LR; 0 = head only)
    lm_weight: float = 0.3
    heldout_percent: int = 15  # pairs held out (by prompt) for the accuracy report
    max_pairs_per_prompt: int = 16
    max_length: int = 192

    def __post_init__(self) -> None:
        _check(self, ("epochs", "max_steps", "batch_size"), lambda v: v >= 1, ">= 1")
        _check(self, ("max_pairs_per_prompt", "max_length"), lambda v: v >= 1, ">= 1")
        _check(self, ("lr",), lambda v: v > 0, "> 0")
        if self.init not in ("previous", "policy"):
            raise ValueError(f"rm_init must be 'previous' or 'policy', got {self.init!r}")
        if not 0 <= self.heldout_percent < 100:
            raise ValueError("rm_heldout_percent must be in [0, 100)")


@dataclass(slots=True)
class PPOConfig:
    """PPO, trlx-style (flat names ``ppo_iterations`` ... ``ppo_lr``; the rest bare)."""

    PREFIX: ClassVar[str] = "ppo_"
    BARE: ClassVar[frozenset[str]] = frozenset(
        {
            "init_kl_coef", "kl_target", "kl_horizon", "gamma", "lam", "cliprange",
            "cliprange_value", "vf_coef", "ent_coef", "whiten_rewards", "cliprange_reward",
            "truncation_penalty", "log_prompt_fraction", "value_warmup_steps", "critic_detach",
        }
    )  # fmt: skip

    iterations: int = 3  # rollout + update cycles per round
    rollouts: int = 64  # rollouts per iteration (over all processes)
    epochs: int = 4
    minibatch: int = 16
    # trlx uses ~1e-5 for large models; a 4M policy barely moves there (docs/decisions.md,
    # "PPO learning rate above trlx's")
    lr: float = 1e-4
    init_kl_coef: float = 0.2
    kl_target: float | None = 6.0  # None = fixed KL coefficient
    kl_horizon: int = 1000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 1.0
    ent_coef: float = 0.001
    whiten_rewards: bool = True
    cliprange_reward: float = 10.0
    truncation_penalty: float = 1.0  # subtracted from the (whitened) score of cut-off replies
    log_prompt_fraction: float = 0.5  # prompts from the conversation log; the rest synthetic
    value_warmup_steps: int = 8  # critic-only steps on the first batch
    critic_detach: bool = False  # value head on detached features (critic never moves policy)

    def __post_init__(self) -> None:
        positive = ("iterations", "rollouts", "epochs", "minibatch", "kl_horizon")
        _check(self, positive, lambda v: v >= 1, ">= 1")
        _check(self, ("lr",), lambda v: v > 0, "> 0")
        if not 0.0 <= self.log_prompt_fraction <= 1.0:
            raise ValueError("log_prompt_fraction must be in [0, 1]")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise ValueError("gamma and lam must be in [0, 1]")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ValueError("kl_target must be > 0 (or None for a fixed coefficient)")


@dataclass(slots=True)
class PreferenceConfig:
    """DPO and KTO (flat names ``pref_*``; the DPO/KTO-specific ones bare)."""

    PREFIX: ClassVar[str] = "pref_"
    BARE: ClassVar[frozenset[str]] = frozenset(
        {
            "beta", "dpo_sft_weight", "dpo_rm_prompts", "dpo_rm_samples", "dpo_rm_min_gap",
            "kto_desirable_weight", "kto_undesirable_weight",
        }
    )  # fmt: skip

    # the policy the DPO/KTO loss measures log-ratios against: "active" = the round's starting
    # policy (iterative DPO: every round is one bounded step from what is serving) or
    # "reference" = the KL reference above (one objective for the whole loop). The gate and
    # PPO always use the KL reference. docs/decisions.md, "Iterative DPO: each round against
    # the serving policy"
    reference: str = "active"
    beta: float = 0.1
    epochs: int = 2
    lr: float = 1e-4
    batch_size: int = 16
    max_steps: int = 48
    # ...and at least this many (more epochs over a small round's data), so the first rounds,
    # with little data, still move the policy: docs/decisions.md, "DPO: at least 32 steps a
    # round"
    min_steps: int = 32
    # + weight * per-token NLL of the chosen replies of logged pairs (RPO); never of the
    # on-policy pairs below, whose chosen reply the reward model picked and may be wrong
    # (docs/decisions.md, "DPO: on-policy pairs, RPO only on logged pairs")
    dpo_sft_weight: float = 0.5
    # on-policy pairs (online DPO): sample dpo_rm_samples replies from the active policy for
    # each of dpo_rm_prompts prompts (logged + generated), score them with this round's reward
    # model, and add (best, worst) when their scores differ by dpo_rm_min_gap (in standard
    # deviations); 0 prompts = logged pairs only. They lift the first rounds well beyond what
    # logged pairs alone do
    dpo_rm_prompts: int = 96
    dpo_rm_samples: int = 4
    dpo_rm_min_gap: float = 1.0
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "max_steps", "min_steps")
        _check(self, positive, lambda v: v >= 1, ">= 1")
        _check(self, ("lr", "beta"), lambda v: v > 0, "> 0")
        if self.reference not in ("active", "reference"):
            raise ValueError(
                f"pref_reference must be 'active' or 'reference', got {self.reference!r}"
            )
        if self.dpo_rm_prompts < 0 or self.dpo_rm_samples < 2 or self.dpo_rm_min_gap < 0:
            raise ValueError(
                "dpo_rm_prompts must be >= 0, dpo_rm_samples >= 2 and dpo_rm_min_gap >= 0"
            )


@dataclass(slots=True)
class GateConfig:
    """The promotion gate (flat names ``gate_*``)."""

    PREFIX: ClassVar[str] = "gate_"
    BARE: ClassVar[frozenset[str]] = frozenset()

    prompts: int = 128
    seed: int = 4242
    max_kl: float = 12.0  # nats per reply, candidate vs the reference policy
    min_reward_gain: float = 0.0  # candidate mean RM score must exceed active's by more
    # each reply's RM score is clipped to +-this many standard deviations before the mean (as
    # trlx clips PPO rewards): a few garbled samples far outside anything the reward model was
    # trained on otherwise outweigh a better policy's other replies. None = no clipping
    # (docs/decisions.md, "Promotion gate: clip reward-model scores")
    reward_clip: float | None = 3.0
    correct_tolerance: float = 0.03  # allowed drop of held-out correct rate
    # safety: held-out unsafe requests answered greedily, on top of ``prompts``; the candidate
    # must refuse them as often as the active policy, and refuse the benign prompts no more
    # often, within this tolerance and a paired sign test (0 prompts: no safety check)
    safety_prompts: int = 48
    safety_tolerance: float = 0.02
    max_new_tokens: int = 64
    # when the trained candidate fails the gate, try it again at these fractions of its step
    # away from the active policy (weights active + f * (candidate - active)), in order; the
    # first that passes is published. A DPO round that overshoots (KL up, reward-model score
    # down) or costs a few answers usually passes at half or a quarter of the step, with most
    # of its reward-model gain (each try re-evaluates the candidate side only). [] = one try
    # only (docs/decisions.md, "Promotion gate: backtracking to a half and a quarter step")
    backtrack: list[float] = field(default_factory=lambda: [0.5, 0.25])

    def __post_init__(self) -> None:
        _check(self, ("prompts", "max_new_tokens"), lambda v: v >= 1, ">= 1")
        if self.safety_prompts < 0 or not 0 <= self.safety_tolerance < 1:
            raise ValueError("gate_safety_prompts must be >= 0, gate_safety_tolerance in [0, 1)")
        if self.reward_clip is not None and not self.reward_clip > 0:
            raise ValueError("gate_reward_clip must be > 0 (or None for no clipping)")
        fractions = self.backtrack
        if not isinstance(fractions, list | tuple) or not all(
            isinstance(f, int | float) and not isinstance(f, bool) and 0.0 < f < 1.0
            for f in fractions
        ):
            raise ValueError(
                f"gate_backtrack must be a list of fractions in (0, 1), e.g. [0.5]; got "
                f"{fractions!r}"
            )
        self.backtrack = [float(f) for f in fractions]


SECTIONS: dict[str, Any] = {
    "reward": RewardConfig,
    "ppo": PPOConfig,
    "preference": PreferenceConfig,
    "gate": GateConfig,
}


@dataclass(slots=True)
class TrainerConfig:
    """Every knob of a round: the loop's own fields here, the phases' in their sections.

    Outside Python a config is flat (``--set ppo_iterations=2``, the recipe in a manifest):
    :meth:`from_flat`, :meth:`to_dict` and :meth:`replace` speak those names."""

    PREFIX: ClassVar[str] = ""
    BARE: ClassVar[frozenset[str]] = frozenset()

    # -- what to train ---------------------------------------------------------------------
    algo: str = "dpo"  # ppo | dpo | kto
    seed: int = 0
    device: str = "cpu"  # cpu | cuda[:N]; under torchrun each rank takes its local GPU
    threads: int = 0  # CPU torch threads per process; 0 = cores / processes
    # under torchrun: "ddp" (every process holds the whole policy) or "fsdp" (DPO and KTO
    # update a copy sharded by block with FSDP2, for a policy whose weights, gradients and
    # optimiser state do not fit one device); the reward model and PPO use DDP either way
    parallel: str = "ddp"

    # KL reference: "first" = the policy active when this database's trainer first ran
    # (kept in trainer_state), "active" = each round's starting policy, or a version "vN"
    reference: str = "first"

    # -- the loop --------------------------------------------------------------------------
    min_new_feedback: int = 32  # --watch trains once this many new items arrived
    poll_seconds: float = 10.0
    settle_seconds: float = 1.0  # feedback newer than this is left for the next poll
    max_train_items: int = 4000  # newest feedback rows / rankings used for training
    publish_rejected: bool = True  # keep a rejected candidate's files (status "rejected")
    # direct: a candidate that passes the gate becomes the active version; canary: it is
    # served to canary_share of users beside the active one, and the live evidence promotes
    # or rolls it back (shared.rollout.live, decided at every --watch poll)
    rollout: str = "direct"
    canary_share: float = 0.1
    # a flagged request's reply (unless a user liked it) loses to the refusal in a pair
    # (trainer.feedback.refusal_pairs); 0 = none, N = at most N such pairs a prompt
    refusal_pairs: int = 4
    # users (API key names) whose conversations the trainer takes no prompts or refusal pairs
    # from: monitoring probes, evaluations
    ignore_users: list[str] = field(default_factory=list)

    # -- shared by the reward model, PPO and DPO/KTO ----------------------------------------
    # -1 = by the policy's size: LoRA of rank lora_auto_rank above lora_auto_params
    # parameters (full fine-tuning would not fit beside the reference and the optimizer
    # state), full fine-tuning below; 0 = full fine-tuning; N = LoRA of rank N
    lora_rank: int = -1
    lora_alpha: float = 16.0
    lora_auto_params: int = 100_000_000
    lora_auto_rank: int = 16
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    # sampling of PPO rollouts and on-policy DPO pairs (temperature: the gate's samples too)
    max_new_tokens: int = 64
    temperature: float = 1.0

    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    extra: dict[str, Any] = field(default_factory=dict)  # free-form, recorded in the recipe

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        positive = ("min_new_feedback", "max_train_items", "max_new_tokens")
        _check(self, positive, lambda v: v >= 1, ">= 1")
        _check(self, ("temperature", "grad_clip"), lambda v: v > 0, "> 0")
        if self.refusal_pairs < 0:
            raise ValueError("refusal_pairs must be >= 0")
        if self.rollout not in ("direct", "canary"):
            raise ValueError(f"rollout must be 'direct' or 'canary', got {self.rollout!r}")
        if not 0 < self.canary_share < 1:
            raise ValueError("canary_share must be between 0 and 1 (exclusive)")
        if self.lora_rank < -1 or self.lora_auto_rank < 1 or self.threads < 0:
            raise ValueError("lora_rank must be >= -1, lora_auto_rank >= 1 and threads >= 0")
        if self.poll_seconds <= 0 or self.settle_seconds < 0:
            raise ValueError("poll_seconds must be > 0 and settle_seconds >= 0")

    def lora_rank_for(self, num_params: int) -> int:
        """The LoRA rank a round on a policy of ``num_params`` parameters uses (0 = none)."""
        if self.lora_rank >= 0:
            return self.lora_rank
        return self.lora_auto_rank if num_params > self.lora_auto_params else 0

    @classmethod
    def flat_names(cls) -> dict[str, tuple[str | None, str]]:
        """Every flat name -> (its section, or None for a top-level field; the field)."""
        names: dict[str, tuple[str | None, str]] = {
            f.name: (None, f.name) for f in dataclasses.fields(cls) if f.name not in SECTIONS
        }
        for section, kind in SECTIONS.items():
            for f in dataclasses.fields(kind):
                names[flat_name(kind, f.name)] = (section, f.name)
        return names

    @classmethod
    def from_flat(cls, **values: Any) -> TrainerConfig:
        """A config from flat names (``TrainerConfig.from_flat(ppo_iterations=2)``)."""
        names = cls.flat_names()
        top: dict[str, Any] = {}
        parts: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
        for key, value in values.items():
            if key not in names:
                raise TypeError(f"TrainerConfig has no field {key!r}")
            section, name = names[key]
            (top if section is None else parts[section])[name] = value
        sections = {section: SECTIONS[section](**kw) for section, kw in parts.items()}
        return cls(**top, **sections)

    def to_dict(self) -> dict[str, Any]:
        """The flat form (what :meth:`from_flat` and ``--set`` take)."""
        out: dict[str, Any] = {}
        for key, (section, name) in self.flat_names().items():
            value = getattr(self if section is None else getattr(self, section), name)
            out[key] = copy.deepcopy(value)
        return out

    def replace(self, **changes: Any) -> TrainerConfig:
        """A copy with ``changes`` given by flat name."""
        return self.from_flat(**{**self.to_dict(), **changes})
