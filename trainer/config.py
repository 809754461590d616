"""Configuration of the online RLHF trainer (``palmchat trainer``).

One dataclass, :class:`TrainerConfig`, holds every knob of a round: which feedback to use, the
reward model, the policy algorithm (PPO, DPO or KTO), the promotion gate and the loop. The
defaults are sized for the ~4M-parameter seed policy on a 2-core CPU; PPO values follow trlx's
PPO config where they make sense at this scale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ALGOS: tuple[str, ...] = ("ppo", "dpo", "kto")


@dataclass(slots=True)
class TrainerConfig:
    # -- what to train ---------------------------------------------------------------------
    algo: str = "dpo"  # ppo | dpo | kto
    seed: int = 0
    device: str = "cpu"  # cpu | cuda[:N]; under torchrun each rank takes its local GPU
    threads: int = 0  # CPU torch threads per process; 0 = cores / processes

    # KL reference: "first" = the policy active when this database's trainer first ran
    # (kept in trainer_state), "active" = each round's starting policy, or a version "vN"
    reference: str = "first"

    # -- the loop --------------------------------------------------------------------------
    min_new_feedback: int = 32  # --watch trains once this many new items arrived
    poll_seconds: float = 10.0
    settle_seconds: float = 1.0  # feedback newer than this is left for the next poll
    max_train_items: int = 4000  # newest feedback rows / rankings used for training
    publish_rejected: bool = True  # keep a rejected candidate's files (status "rejected")

    # -- LoRA (policy and reward model) ----------------------------------------------------
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 16.0

    # -- reward model ----------------------------------------------------------------------
    rm_init: str = "previous"  # previous: continue from the last round's reward model; policy
    rm_epochs: int = 4
    rm_max_steps: int = 48
    rm_lr: float = 1e-4
    rm_batch_size: int = 16  # pairs per step
    rm_margin: float = 0.0  # BT margin per rank of distance (0 = plain Bradley-Terry)
    rm_pointwise_weight: float = 0.5  # weight of the thumbs (BCE) term
    # + rm_lm_weight * log-likelihood of the reply under the trunk's LM head (learned from this
    # start, at its own rate, reward.LM_WEIGHT_LR; 0 = head only)
    rm_lm_weight: float = 0.3
    rm_heldout_percent: int = 15  # pairs held out (by prompt) for the accuracy report
    rm_max_pairs_per_prompt: int = 16
    rm_max_length: int = 192

    # -- PPO (trlx-style) ------------------------------------------------------------------
    ppo_iterations: int = 3  # rollout + update cycles per round
    ppo_rollouts: int = 64  # rollouts per iteration (over all processes)
    ppo_epochs: int = 4
    ppo_minibatch: int = 16
    # trlx uses ~1e-5 for large models; a 4M policy barely moves there (docs/decisions.md,
    # "PPO learning rate above trlx's")
    ppo_lr: float = 1e-4
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
    max_new_tokens: int = 64
    temperature: float = 1.0
    log_prompt_fraction: float = 0.5  # prompts from the conversation log; the rest synthetic
    value_warmup_steps: int = 8  # critic-only steps on the first batch
    critic_detach: bool = False  # value head on detached features (critic never moves policy)

    # -- DPO / KTO -------------------------------------------------------------------------
    # the policy the DPO/KTO loss measures log-ratios against: "active" = the round's starting
    # policy (iterative DPO: every round is one bounded step from what is serving) or
    # "reference" = the KL reference above (one objective for the whole loop). The gate and
    # PPO always use the KL reference. docs/decisions.md, "Iterative DPO: each round against
    # the serving policy"
    pref_reference: str = "active"
    beta: float = 0.1
    pref_epochs: int = 2
    pref_lr: float = 1e-4
    pref_batch_size: int = 16
    pref_max_steps: int = 48
    # ...and at least this many (more epochs over a small round's data), so the first rounds,
    # with little data, still move the policy: docs/decisions.md, "DPO: at least 32 steps a
    # round"
    pref_min_steps: int = 32
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

    # -- shared optimisation ---------------------------------------------------------------
    grad_clip: float = 1.0
    weight_decay: float = 0.0

    # -- promotion gate --------------------------------------------------------------------
    gate_prompts: int = 128
    gate_seed: int = 4242
    gate_max_kl: float = 12.0  # nats per reply, candidate vs the reference policy
    gate_min_reward_gain: float = 0.0  # candidate mean RM score must exceed active's by more
    # each reply's RM score is clipped to +-this many standard deviations before the mean (as
    # trlx clips PPO rewards): a few garbled samples far outside anything the reward model was
    # trained on otherwise outweigh a better policy's other replies. None = no clipping
    # (docs/decisions.md, "Promotion gate: clip reward-model scores")
    gate_reward_clip: float | None = 3.0
    gate_correct_tolerance: float = 0.03  # allowed drop of held-out correct rate
    gate_max_new_tokens: int = 64
    # when the trained candidate fails the gate, try it again at these fractions of its step
    # away from the active policy (weights active + f * (candidate - active)), in order; the
    # first that passes is published. A DPO round that overshoots (KL up, reward-model score
    # down) or costs a few answers usually passes at half or a quarter of the step, with most
    # of its reward-model gain (each try re-evaluates the candidate side only). [] = one try
    # only (docs/decisions.md, "Promotion gate: backtracking to a half and a quarter step")
    gate_backtrack: list[float] = field(default_factory=lambda: [0.5, 0.25])

    extra: dict[str, Any] = field(default_factory=dict)  # free-form, recorded in the recipe

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        positive = (
            "min_new_feedback",
            "max_train_items",
            "rm_epochs",
            "rm_max_steps",
            "rm_batch_size",
            "rm_max_pairs_per_prompt",
            "rm_max_length",
            "ppo_iterations",
            "ppo_rollouts",
            "ppo_epochs",
            "ppo_minibatch",
            "max_new_tokens",
            "pref_epochs",
            "pref_batch_size",
            "pref_max_steps",
            "pref_min_steps",
            "gate_prompts",
            "gate_max_new_tokens",
            "kl_horizon",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainerConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rm_lr", "ppo_lr", "pref_lr", "beta", "temperature", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainerConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.pref_reference not in ("active", "reference"):
            raise ValueError(
                f"pref_reference must be 'active' or 'reference', got {self.pref_reference!r}"
            )
        if self.rm_init not in ("previous", "policy"):
            raise ValueError(f"rm_init must be 'previous' or 'policy', got {self.rm_init!r}")
        if not 0 <= self.rm_heldout_percent < 100:
            raise ValueError("rm_heldout_percent must be in [0, 100)")
        if not 0.0 <= self.log_prompt_fraction <= 1.0:
            raise ValueError("log_prompt_fraction must be in [0, 1]")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise ValueError("gamma and lam must be in [0, 1]")
        if self.gate_reward_clip is not None and not self.gate_reward_clip > 0:
            raise ValueError("gate_reward_clip must be > 0 (or None for no clipping)")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ValueError("kl_target must be > 0 (or None for a fixed coefficient)")
        if self.lora_rank < 0 or self.threads < 0:
            raise ValueError("lora_rank and threads must be >= 0")
        if self.dpo_rm_prompts < 0 or self.dpo_rm_samples < 2 or self.dpo_rm_min_gap < 0:
            raise ValueError(
                "dpo_rm_prompts must be >= 0, dpo_rm_samples >= 2 and dpo_rm_min_gap >= 0"
            )
        fractions = self.gate_backtrack
        if not isinstance(fractions, list | tuple) or not all(
            isinstance(f, int | float) and not isinstance(f, bool) and 0.0 < f < 1.0
            for f in fractions
        ):
            raise ValueError(
                f"gate_backtrack must be a list of fractions in (0, 1), e.g. [0.5]; got "
                f"{fractions!r}"
            )
        self.gate_backtrack = [float(f) for f in fractions]
        if self.poll_seconds <= 0 or self.settle_seconds < 0:
            raise ValueError("poll_seconds must be > 0 and settle_seconds >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainerConfig:
        return dataclasses.replace(self, **changes)
