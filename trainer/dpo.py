"""DPO on logged preference pairs and KTO on logged thumbs: offline alternatives to PPO.

DPO (https://arxiv.org/abs/2305.18290): ``-log sigmoid(beta * ((log pi(y_c) - log ref(y_c)) -
(log pi(y_r) - log ref(y_r))))``. KTO (https://arxiv.org/abs/2402.01306): desirable replies
are pushed above, undesirable ones below, a reference point ``z`` = the batch's KL estimate
``mean(log pi(y) - log ref(y))`` (clamped at 0, no gradient) - the cheap in-batch estimate,
rather than TRL's mismatched-prompt one. The reference is the frozen loop-start policy; the
policy being trained starts from the active one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from shared.families import PolicyModel
from shared.tokenizer import Tokenizer
from trainer.common import (
    DistInfo,
    Progress,
    adamw,
    all_mean,
    batched_sequence_logprobs,
    collate,
    encode_reply,
    gather_trained,
    optimizer_step,
    sequence_logprobs,
    shard,
    wrap_ddp,
    wrap_sharded,
)
from trainer.config import TrainerConfig
from trainer.feedback import Pair, Thumb, prompt_key
from trainer.lora import apply_lora, has_lora, merge_lora

if TYPE_CHECKING:
    from trainer.reward import RewardModel

E = TypeVar("E")
T = TypeVar("T")


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, chosen rewards, rejected rewards); inputs are summed reply log-probs (B,)."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(loss, reference point z). ``labels`` are +1 (desirable) / -1 (undesirable);
    ``weights`` (one per example: a labelled reply weighs more, ``LABEL_WEIGHTS``) make the
    loss a weighted mean."""
    log_ratio = policy_logps - ref_logps
    z = log_ratio.detach().mean().clamp(min=0)
    up = labels > 0
    losses = torch.where(
        up,
        desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - z))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z - log_ratio))),
    )
    if weights is None:
        return losses.mean(), z
    return (losses * weights).sum() / weights.sum(), z


@dataclass(slots=True)
class PreferenceJob:
    """What DPO and KTO read besides their examples: ``policy`` is trained in place, its
    log-ratios measured against the frozen ``reference``."""

    policy: PolicyModel
    reference: PolicyModel
    tok: Tokenizer
    config: TrainerConfig
    info: DistInfo = field(default_factory=DistInfo)
    progress: Progress | None = None
    seed: int = 0
    max_len: int = 192
    ref_cache: dict[tuple, float] | None = None  # memoised log-probs under ``reference``


@dataclass
class PreferenceReport:
    algo: str
    steps: int = 0
    examples: int = 0
    loss_first: float = float("nan")
    loss_last: float = float("nan")
    reward_margin: float = float("nan")  # DPO: mean implicit chosen - rejected reward, last steps
    accuracy: float = float("nan")  # DPO: share of pairs with a positive implicit margin
    kl_ref_point: float = float("nan")  # KTO: the reference point z

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in self.__dict__.items()
        }


def _steps(n: int, config: TrainerConfig, world: int) -> int:
    per_epoch = math.ceil(n / (config.preference.batch_size * world))
    return min(
        config.preference.max_steps,
        max(config.preference.min_steps, config.preference.epochs * per_epoch),
    )


def _subset(items: Sequence, steps: int, config: TrainerConfig, world: int, seed: int) -> list:
    """At most what ``steps`` steps can use, sampled: a round's cost stays bounded as the
    feedback log grows (older examples come back in later rounds)."""
    items = list(items)
    budget = steps * config.preference.batch_size * world
    if len(items) > budget:
        items = random.Random(seed).sample(items, budget)
    return items


def _my_share(
    job: PreferenceJob, items: Sequence[E], encode: Callable[[E], T]
) -> tuple[int, list[T]]:
    """The number of steps to run on ``items`` and this process's shard of a bounded sample of
    them, encoded."""
    steps = _steps(len(items), job.config, job.info.world)
    sample = _subset(items, steps, job.config, job.info.world, job.seed)
    return steps, shard([encode(x) for x in sample], job.info, job.seed)


def _reference_logprobs(job: PreferenceJob, seqs: Sequence) -> list[float]:
    """Summed reply log-probs under the frozen reference, memoised across rounds in
    ``job.ref_cache`` (the caller keeps one per reference version)."""
    reference = job.reference.eval().requires_grad_(False)
    keys = [tuple(s.ids) + (s.start,) for s in seqs]
    cache = job.ref_cache if job.ref_cache is not None else {}
    missing = [i for i, k in enumerate(keys) if k not in cache]
    if missing:
        values = batched_sequence_logprobs(reference, [seqs[i] for i in missing], job.tok.pad_id)
        for i, v in zip(missing, values.tolist(), strict=True):
            cache[keys[i]] = v
    return [cache[k] for k in keys]


def _batches(items: list, steps: int, batch_size: int, seed: int):
    order: list[int] = []
    epoch = 0
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(items)))
            random.Random(seed * 1_000_003 + epoch).shuffle(fresh)
            order += fresh
            epoch += 1
        picked, order = order[:batch_size], order[batch_size:]
        yield [items[i] for i in picked]


@torch.no_grad()
def reward_ranked_pairs(
    policy: PolicyModel,
    reward_model: RewardModel,
    tok: Tokenizer,
    prompts: Sequence[list[dict[str, str]]],
    config: TrainerConfig,
    *,
    seed: int = 0,
) -> list[Pair]:
    """On-policy pairs labelled by the reward model (online / iterative DPO): sample
    ``config.preference.dpo_rm_samples`` replies to each prompt from ``policy`` with the
    serving engine, score them, and pair the best with the worst when the scores differ by at
    least ``config.preference.dpo_rm_min_gap``. A reply cut off at the token limit is never the
    chosen one.
    Every pair is ``source="reward_model"``."""
    from trainer.ppo import generate_rollouts

    k = config.preference.dpo_rm_samples
    asked = [p for p in prompts for _ in range(k)]
    rollouts = generate_rollouts(
        policy,
        tok,
        asked,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        seed=seed,
    )
    if not rollouts:
        return []
    scores = reward_model.score(
        tok, [r.prompt for r in rollouts], [r.text for r in rollouts], config.reward.max_length
    ).tolist()
    groups: dict[str, list[tuple[float, Any]]] = {}
    for r, score in zip(rollouts, scores, strict=True):
        groups.setdefault(prompt_key(r.prompt), []).append((score, r))
    pairs = []
    for group in groups.values():
        finished = [g for g in group if not g[1].truncated]
        if len(group) < 2 or not finished:
            continue
        best = max(finished, key=lambda g: g[0])
        worst = min(group, key=lambda g: g[0])
        gap = best[0] - worst[0]
        if gap >= config.preference.dpo_rm_min_gap and best[1].text != worst[1].text:
            pairs.append(Pair(best[1].prompt, best[1].text, worst[1].text, source="reward_model"))
    return pairs


def _trainable(
    job: PreferenceJob,
) -> tuple[list[torch.nn.Parameter], torch.nn.Module, torch.optim.Optimizer]:
    """What a preference trainer updates (LoRA adapters, or every weight), the model to run
    (when distributed: DDP-wrapped, or a sharded copy with ``parallel`` "fsdp") and its
    optimiser."""
    policy, config = job.policy, job.config
    params = list(policy.parameters())
    rank = config.lora_rank_for(policy.num_params())
    if rank:
        params = apply_lora(policy, rank, config.lora_alpha)
    if config.parallel == "fsdp":
        model = wrap_sharded(policy, job.info)
        params = [p for p in model.parameters() if p.requires_grad]  # the shards, if any
    else:
        model = wrap_ddp(policy, job.info)
    return params, model.train(), adamw(params, config.preference.lr, config.weight_decay)


def _finish(
    job: PreferenceJob,
    model: torch.nn.Module,
    report: PreferenceReport,
    losses: list[float],
    *series: list[float],
) -> list[float]:
    """Gather a sharded copy's weights back, fold LoRA in, unfreeze, record the step count
    and first loss; returns the means over the last (up to) 10 steps of ``losses`` and each
    of ``series``, averaged over the processes (empty when no step ran)."""
    if job.config.parallel == "fsdp":
        gather_trained(model, job.policy)
    if has_lora(job.policy):
        merge_lora(job.policy)
    job.policy.requires_grad_(True)
    report.steps = len(losses)
    if not losses:
        return []
    tail = min(10, len(losses))
    report.loss_first = all_mean([losses[0]], job.info)[0]
    return all_mean([sum(x[-tail:]) / tail for x in (losses, *series)], job.info)


def train_dpo(job: PreferenceJob, pairs: Sequence[Pair]) -> PreferenceReport:
    """Train ``job.policy`` in place with DPO on ``pairs`` (a bounded sample of them)."""
    policy, tok, config, seed = job.policy, job.tok, job.config, job.seed
    report = PreferenceReport("dpo", examples=len(pairs))
    steps, mine = _my_share(
        job,
        pairs,
        lambda p: (
            encode_reply(tok, p.prompt, p.chosen, job.max_len),
            encode_reply(tok, p.prompt, p.rejected, job.max_len),
            p.source != "reward_model",  # a user picked the chosen reply
        ),
    )
    if not mine:
        return report
    ref_c = _reference_logprobs(job, [c for c, _, _ in mine])
    ref_r = _reference_logprobs(job, [r for _, r, _ in mine])
    items = list(zip(mine, ref_c, ref_r, strict=True))
    device = policy.device  # before _trainable: with FSDP the whole copy waits on the CPU
    params, model, opt = _trainable(job)
    losses, margins, accs = [], [], []
    policy.train()
    for step, chunk in enumerate(_batches(items, steps, config.preference.batch_size, seed)):
        seqs = [x for (c, r, _), _, _ in chunk for x in (c, r)]
        batch = collate(seqs, tok.pad_id).to(device)
        logps = sequence_logprobs(model, batch)
        rc = torch.tensor([a for _, a, _ in chunk], device=device)
        rr = torch.tensor([b for _, _, b in chunk], device=device)
        loss, chosen, rejected = dpo_loss(logps[0::2], logps[1::2], rc, rr, config.preference.beta)
        if config.preference.dpo_sft_weight:
            # RPO-style NLL of the chosen replies, per token (https://arxiv.org/abs/2404.19733),
            # only of replies a user picked: the reward model's favourite among on-policy
            # samples may be a wrong answer in the users' style, and imitating it costs answers
            tokens = batch.mask[0::2].sum(-1).clamp(min=1)
            picked = torch.tensor([s for (_, _, s), _, _ in chunk], device=device)
            nll = (-logps[0::2] / tokens)[picked].sum() / len(chunk)
            loss = loss + config.preference.dpo_sft_weight * nll
        optimizer_step(opt, loss, params, config.grad_clip)
        losses.append(loss.item())
        margins.append(float((chosen - rejected).mean()))
        accs.append(float((chosen > rejected).float().mean()))
        if job.progress is not None:
            job.progress(
                "dpo", step + 1, steps, f"loss {loss.item():.3f} margin {margins[-1]:+.3f}"
            )
    tails = _finish(job, model, report, losses, margins, accs)
    if tails:
        report.loss_last, report.reward_margin, report.accuracy = tails
    return report


def train_kto(job: PreferenceJob, thumbs: Sequence[Thumb]) -> PreferenceReport:
    """Train ``job.policy`` in place with KTO on thumbs (up = desirable; a bounded sample)."""
    policy, tok, config, seed = job.policy, job.tok, job.config, job.seed
    report = PreferenceReport("kto", examples=len(thumbs))
    steps, mine = _my_share(
        job,
        thumbs,
        lambda t: (encode_reply(tok, t.prompt, t.reply, job.max_len), (t.label, t.weight)),
    )
    if not mine:
        return report
    ref = _reference_logprobs(job, [e for e, _ in mine])
    items = list(zip(mine, ref, strict=True))
    device = policy.device  # before _trainable: with FSDP the whole copy waits on the CPU
    params, model, opt = _trainable(job)
    losses, zs = [], []
    policy.train()
    for step, chunk in enumerate(_batches(items, steps, config.preference.batch_size, seed)):
        batch = collate([e for (e, _), _ in chunk], tok.pad_id).to(device)
        logps = sequence_logprobs(model, batch)
        ref_lp = torch.tensor([r for _, r in chunk], device=device)
        labels = torch.tensor([lab for (_, (lab, _)), _ in chunk], device=device)
        weights = torch.tensor([w for (_, (_, w)), _ in chunk], device=device)
        loss, z = kto_loss(
            logps,
            ref_lp,
            labels,
            config.preference.beta,
            config.preference.kto_desirable_weight,
            config.preference.kto_undesirable_weight,
            weights,
        )
        optimizer_step(opt, loss, params, config.grad_clip)
        losses.append(loss.item())
        zs.append(float(z))
        if job.progress is not None:
            job.progress("kto", step + 1, steps, f"loss {loss.item():.3f} z {zs[-1]:.3f}")
    tails = _finish(job, model, report, losses, zs)
    if tails:
        report.loss_last, report.kl_ref_point = tails
    return report
