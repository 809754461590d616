"""PPO for the chat policy, trlx-style (https://arxiv.org/abs/1707.06347,
https://arxiv.org/abs/2203.02155).

One iteration: sample replies to a batch of prompts with the serving engine's batched KV-cache
generation (:func:`generate_rollouts`, the same code path the server uses), score them with the
reward model (whitened over the batch, cut-off replies penalised), turn scores into per-token
rewards with a KL penalty to the frozen reference policy (``r_t = -beta * (log pi - log
pi_ref)``, plus the score on the last token), compute advantages with GAE, then run several
epochs of clipped policy + clipped value loss (and an entropy bonus) over minibatches. The KL
coefficient ``beta`` follows an adaptive controller towards a target KL
(https://arxiv.org/abs/1909.08593).

The critic is a small MLP value head on the policy's final hidden states. Log-probabilities of
the sampled tokens are recomputed with a forward pass rather than taken from the engine: the
engine does not report the log-prob of the ``<|end|>`` that finished a reply, and recomputing
keeps old and new log-probs numerically identical at the first PPO step.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from shared.families import PolicyModel
from shared.tokenizer import Tokenizer, apply_chat_template
from trainer.common import (
    ChatMessages,
    DistInfo,
    Encoded,
    Progress,
    adamw,
    all_mean,
    collate,
    entropy_of,
    masked_mean,
    optimizer_step,
    token_logprobs,
    wrap_ddp,
)
from trainer.config import TrainerConfig
from trainer.lora import apply_lora, has_lora, merge_lora

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the maths


def whiten(x: Tensor, mask: Tensor | None = None, shift_mean: bool = True) -> Tensor:
    """Zero-mean (optionally), unit-variance ``x`` over the entries where ``mask`` is 1."""
    if mask is None:
        mask = torch.ones_like(x)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (https://arxiv.org/abs/1506.02438).

    ``rewards``, ``values`` and ``mask`` are (B, T); positions where ``mask`` is 0 (prompt and
    padding) count as zero-valued and past the end of the episode. Returns (advantages,
    returns) with ``returns = advantages + values``.
    """
    values = values * mask
    rewards = rewards * mask
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


class AdaptiveKLController:
    """Ziegler et al.'s controller: ``beta *= 1 + clip(KL / target - 1, +-0.2) * n / horizon``."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = float(np.clip(current_kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + error * n_steps / self.horizon


class FixedKLController:
    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


def make_kl_controller(config: TrainerConfig, value: float | None = None):
    init = config.ppo.init_kl_coef if value is None else value
    if config.ppo.kl_target is None:
        return FixedKLController(init)
    return AdaptiveKLController(init, config.ppo.kl_target, config.ppo.kl_horizon)


def kl_penalised_rewards(
    scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """Per-token rewards ``-kl_coef * (logp - ref_logp)`` on response tokens, plus each row's
    score on its last response token. Returns (rewards (B, T), KL per row (B,))."""
    log_ratio = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * log_ratio
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores
    return rewards * mask, log_ratio.sum(1)


def ppo_loss(
    logprobs: Tensor,
    values: Tensor,
    old_logprobs: Tensor,
    old_values: Tensor,
    advantages: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    cliprange: float,
    cliprange_value: float,
    vf_coef: float,
    entropy: Tensor | None = None,
    ent_coef: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate policy loss + clipped value loss (- entropy bonus), masked means."""
    n = mask.sum().clamp(min=1.0)
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf_loss1 = (values - returns) ** 2
    vf_loss2 = (values_clipped - returns) ** 2
    vf_loss = 0.5 * torch.sum(torch.max(vf_loss1, vf_loss2) * mask) / n
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = torch.sum(torch.max(pg_loss1, pg_loss2) * mask) / n
    loss = pg_loss + vf_coef * vf_loss
    ent = torch.zeros(())
    if entropy is not None:
        ent = torch.sum(entropy * mask) / n
        loss = loss - ent_coef * ent
    with torch.no_grad():
        stats = {
            "policy_loss": float(pg_loss),
            "value_loss": float(vf_loss),
            "entropy": float(ent),
            "clipfrac": float(torch.sum((pg_loss2 > pg_loss1).float() * mask) / n),
            "vf_clipfrac": float(torch.sum((vf_loss2 > vf_loss1).float() * mask) / n),
            "approx_kl": float(torch.sum(((ratio - 1) - log_ratio) * mask) / n),
        }
    return loss, stats


# --------------------------------------------------------------------------- models


class ActorCritic(nn.Module):
    """The policy plus an MLP value head on its final hidden states."""

    def __init__(self, policy: PolicyModel, detach_critic: bool = False) -> None:
        super().__init__()
        dim = policy.config.dim
        self.policy = policy
        self.value_head = nn.Sequential(nn.Linear(dim, dim * 2), nn.ReLU(), nn.Linear(dim * 2, 1))
        last = cast(nn.Linear, self.value_head[2])  # the value output starts at 0
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.detach_critic = detach_critic

    def forward(self, tokens: Tensor, critic_only: bool = False) -> tuple[Tensor, Tensor]:
        hidden = self.policy.hidden(tokens)
        h = hidden.detach() if (self.detach_critic or critic_only) else hidden
        values = self.value_head(h).squeeze(-1).float()
        logits = self.policy.to_logits(hidden)
        return logits, values


# --------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    prompt: ChatMessages
    prompt_ids: list[int]
    response_ids: list[int]  # generated ids, with <|end|> when the reply finished
    text: str
    truncated: bool

    def encoded(self, max_len: int) -> Encoded:
        ids = (self.prompt_ids + self.response_ids)[:max_len]
        return Encoded(ids, min(len(self.prompt_ids), len(ids) - 1))


@torch.no_grad()
def generate_rollouts(
    model: PolicyModel,
    tok: Tokenizer,
    prompts: Sequence[ChatMessages],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[Rollout]:
    """Sample one reply per prompt with the server's engine (:func:`server.engine.offline.
    generate`: continuous batching, paged KV cache, the server's sampler, on a copy of
    ``model``). Prompts that leave no room for a reply are skipped."""
    from server.engine import FinishReason, SamplingParams
    from server.engine.offline import generate

    limit = model.config.max_seq_len
    prompt_ids = [apply_chat_template(tok, p, add_generation_prompt=True) for p in prompts]
    keep = [i for i, ids in enumerate(prompt_ids) if len(ids) < limit - 1]
    if not keep:
        return []
    prompt_ids = [prompt_ids[i] for i in keep]
    prompts = [prompts[i] for i in keep]
    params = SamplingParams(temperature=temperature, top_p=1.0, max_tokens=max_new_tokens)
    finals = generate(model, tok, prompt_ids, params, seed=seed)
    out = []
    for prompt, ids, delta in zip(prompts, prompt_ids, finals, strict=True):
        stopped = delta.finish_reason == FinishReason.STOP
        response = list(delta.token_ids) + ([tok.end_id] if stopped else [])
        if not response:
            response = [tok.end_id]
        out.append(Rollout(prompt, ids, response, tok.decode(delta.token_ids), not stopped))
    return out


# --------------------------------------------------------------------------- training


@dataclass
class PPOReport:
    iterations: int = 0
    rollouts: int = 0
    score_mean: float = float("nan")  # reward-model score of the rollouts (normalised)
    score_first: float = float("nan")  # ... in the first iteration
    score_last: float = float("nan")  # ... in the last iteration
    kl: float = float("nan")  # KL(policy || reference) per reply, last iteration
    kl_coef: float = float("nan")
    policy_loss: float = float("nan")
    value_loss: float = float("nan")
    entropy: float = float("nan")
    clipfrac: float = float("nan")
    truncated: float = float("nan")
    response_tokens: float = float("nan")
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "history"}
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def _forward_stats(
    model: ActorCritic, reference: PolicyModel, tokens: Tensor, mask: Tensor, batch_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """old log-probs, reference log-probs and values, each (N, T - 1)."""
    lps, refs, vals = [], [], []
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            t = tokens[start : start + batch_size]
            logits, values = model(t)
            lps.append(token_logprobs(logits, t))
            refs.append(token_logprobs(reference(t), t))
            vals.append(values[:, :-1])
    m = mask
    return torch.cat(lps) * m, torch.cat(refs) * m, torch.cat(vals) * m


def train_ppo(
    policy: PolicyModel,
    reference: PolicyModel,
    reward_model: Any,
    tok: Tokenizer,
    prompts: Sequence[ChatMessages],
    config: TrainerConfig,
    *,
    kl_controller: AdaptiveKLController | FixedKLController | None = None,
    info: DistInfo | None = None,
    progress: Progress | None = None,
    seed: int = 0,
) -> PPOReport:
    """Improve ``policy`` in place against ``reward_model`` with ``config.ppo.iterations`` PPO
    iterations; ``reference`` stays frozen. Returns statistics of the run."""
    info = info or DistInfo()
    kl_ctl = kl_controller or make_kl_controller(config)
    device = policy.device
    reference.eval().requires_grad_(False)
    ac = ActorCritic(policy, detach_critic=config.ppo.critic_detach)
    ac.to(device)
    params = list(ac.parameters())
    rank = config.lora_rank_for(policy.num_params())
    if rank:
        params = apply_lora(ac.policy, rank, config.lora_alpha)
        params += list(ac.value_head.parameters())
    model = wrap_ddp(ac, info)
    opt = adamw(params, config.ppo.lr, config.weight_decay)
    report = PPOReport()
    per_rank = max(1, config.ppo.rollouts // info.world)
    max_len = policy.config.max_seq_len
    rng = random.Random(seed)
    scores_all: list[float] = []
    total_updates = (
        config.ppo.iterations * config.ppo.epochs * math.ceil(per_rank / config.ppo.minibatch)
    )
    done_updates = 0
    for it in range(config.ppo.iterations):
        batch_prompts = [prompts[rng.randrange(len(prompts))] for _ in range(per_rank * info.world)]
        mine = batch_prompts[info.rank * per_rank : (info.rank + 1) * per_rank]
        rollouts = generate_rollouts(
            policy,
            tok,
            mine,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            seed=seed * 1000 + it * 10 + info.rank,
        )
        if len(rollouts) < len(mine):  # keep every rank's step count equal
            rollouts += rollouts[: len(mine) - len(rollouts)] if rollouts else []
        seqs = [r.encoded(max_len) for r in rollouts]
        batch = collate(seqs, tok.pad_id).to(device)
        raw = reward_model.score(tok, [r.prompt for r in rollouts], [r.text for r in rollouts])
        raw = raw.to(device)
        truncated = torch.tensor([r.truncated for r in rollouts], device=device, dtype=torch.float)
        scores = raw - config.ppo.truncation_penalty * truncated
        if config.ppo.whiten_rewards:
            mean, sq = all_mean([float(scores.mean()), float((scores**2).mean())], info)
            scores = (scores - mean) / math.sqrt(max(sq - mean**2, 0.0) + 1e-8)
        scores = scores.clamp(-config.ppo.cliprange_reward, config.ppo.cliprange_reward)
        old_lp, ref_lp, old_v = _forward_stats(
            ac, reference, batch.tokens, batch.mask, config.ppo.minibatch
        )
        rewards, kl_rows = kl_penalised_rewards(scores, old_lp, ref_lp, batch.mask, kl_ctl.value)
        if it == 0 and config.ppo.value_warmup_steps:
            # fit the fresh critic to Monte-Carlo returns first, so early advantages are not
            # pure noise; then recompute the values the advantages are built on
            mc = gae(rewards, torch.zeros_like(old_v), batch.mask, config.ppo.gamma, 1.0)[1]
            _value_warmup(ac, opt, params, batch, mc, config, info)
            old_lp, ref_lp, old_v = _forward_stats(
                ac, reference, batch.tokens, batch.mask, config.ppo.minibatch
            )
        adv, ret = gae(rewards, old_v, batch.mask, config.ppo.gamma, config.ppo.lam)
        adv = whiten(adv, batch.mask)
        stats: list[dict[str, float]] = []
        n = len(seqs)
        for _epoch in range(config.ppo.epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(rng.getrandbits(31)))
            for start in range(0, n, config.ppo.minibatch):
                idx = order[start : start + config.ppo.minibatch].to(device)
                width = int(batch.last[idx].max()) + 1
                tokens = batch.tokens[idx, :width]
                m = batch.mask[idx, : width - 1]
                logits, values = model(tokens)
                loss, st = ppo_loss(
                    token_logprobs(logits, tokens),
                    values[:, :-1],
                    old_lp[idx, : width - 1],
                    old_v[idx, : width - 1],
                    adv[idx, : width - 1],
                    ret[idx, : width - 1],
                    m,
                    cliprange=config.ppo.cliprange,
                    cliprange_value=config.ppo.cliprange_value,
                    vf_coef=config.ppo.vf_coef,
                    entropy=entropy_of(logits) if config.ppo.ent_coef else None,
                    ent_coef=config.ppo.ent_coef,
                )
                optimizer_step(opt, loss, params, config.grad_clip)
                stats.append(st)
                done_updates += 1
                if progress is not None:
                    progress(
                        "ppo",
                        done_updates,
                        total_updates,
                        f"iter {it + 1}/{config.ppo.iterations} score {float(raw.mean()):+.2f} "
                        f"kl {float(kl_rows.mean()):.2f} beta {kl_ctl.value:.3f}",
                    )
        score_mean, kl_mean = all_mean([float(raw.mean()), float(kl_rows.mean())], info)
        kl_ctl.update(kl_mean, n_steps=per_rank * info.world)
        avg = {k: sum(s[k] for s in stats) / max(len(stats), 1) for k in stats[0]} if stats else {}
        avg = dict(zip(avg, all_mean(list(avg.values()), info), strict=True))
        row = {
            "iteration": it,
            "score": score_mean,
            "kl": kl_mean,
            "kl_coef": kl_ctl.value,
            "truncated": float(truncated.mean()),
            "response_tokens": float(batch.mask.sum(1).mean()),
            **avg,
        }
        report.history.append(row)
        scores_all.append(score_mean)
        log.info("ppo iteration %d: %s", it, {k: round(v, 4) for k, v in row.items()})
    if has_lora(policy):
        merge_lora(policy)
    policy.requires_grad_(True)
    last = report.history[-1] if report.history else {}
    report.iterations = len(report.history)
    report.rollouts = per_rank * info.world * report.iterations
    report.score_mean = sum(scores_all) / max(len(scores_all), 1)
    report.score_first = scores_all[0] if scores_all else float("nan")
    report.score_last = scores_all[-1] if scores_all else float("nan")
    for key in ("kl", "kl_coef", "policy_loss", "value_loss", "entropy", "clipfrac"):
        setattr(report, key, last.get(key, float("nan")))
    report.truncated = last.get("truncated", float("nan"))
    report.response_tokens = last.get("response_tokens", float("nan"))
    return report


def _value_warmup(
    ac: ActorCritic, opt, params, batch, returns: Tensor, config: TrainerConfig, info: DistInfo
) -> None:
    """Critic-only steps on the hidden states (the policy does not move). Runs outside DDP,
    whose reducer expects every parameter to get a gradient; value-head gradients are
    averaged over ranks by hand."""
    n = batch.tokens.shape[0]
    for step in range(config.ppo.value_warmup_steps):
        start = (step * config.ppo.minibatch) % n
        idx = torch.arange(start, min(start + config.ppo.minibatch, n), device=batch.tokens.device)
        width = int(batch.last[idx].max()) + 1
        _, values = ac(batch.tokens[idx, :width], critic_only=True)
        m = batch.mask[idx, : width - 1]
        loss = 0.5 * masked_mean((values[:, :-1] - returns[idx, : width - 1]) ** 2, m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if info.enabled:
            import torch.distributed as dist

            for p in ac.value_head.parameters():
                assert p.grad is not None  # the value loss reaches every value-head weight
                dist.all_reduce(p.grad)
                p.grad /= info.world
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
