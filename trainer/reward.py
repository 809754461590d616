"""Reward model: the policy's trunk with a scalar head on the last token.

Trained on the feedback in the database: a Bradley-Terry loss on preference pairs
(``-log sigmoid(r_chosen - r_rejected - margin)``) plus a pointwise logistic term on thumbs
(up = 1, down = 0). Its held-out pairwise accuracy (pairs split off by prompt) is reported,
and each trained model is saved as a versioned artifact next to the policy registry::

    <data_dir>/reward_models/v3/{model.safetensors, tokenizer.json, manifest.json}

published and verified by the policy registry's functions (temp dir, fsync, rename; sha256 on
load, a ``CheckpointError`` for a damaged file); no pickle. Scores are normalised by the mean
and spread of the training replies' raw rewards, so a score is in "standard deviations above a
typical logged reply".
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from shared.checkpoints import (
    MODEL_FILE,
    TOKENIZER_FILE,
    VersionDirectory,
    commit_version_dir,
    file_entries,
    staging_dir,
    verify_version_dir,
)
from shared.families import PolicyModel, build_model, config_from_dict, family_of
from shared.tokenizer import Tokenizer, load_tokenizer
from trainer.common import (
    DistInfo,
    Encoded,
    Progress,
    all_mean,
    collate,
    encode_reply,
    optimizer_step,
    shard,
    token_logprobs,
    wrap_ddp,
)
from trainer.feedback import FeedbackData, Pair, Thumb
from trainer.lora import apply_lora, merge_lora

log = logging.getLogger(__name__)

FORMAT = "palmchat-reward/2"  # /2: + the likelihood term's weight


# starting weight of the likelihood term (then learned with the head): right-vs-wrong pairs
# gain most from it, and a much larger start hurts pairs of two wrong replies
# (docs/decisions.md, "Reward model: a learned likelihood term")
LM_WEIGHT_INIT = 0.3
# learning rate of that weight: an O(1) scalar that Adam moves by about this much a step; at
# the head's rate it would barely move in a round (docs/decisions.md, "Reward model: the
# likelihood weight's own learning rate")
LM_WEIGHT_LR = 0.02


class RewardModel(nn.Module):
    """``reward = head(h_end) + lm_weight * log p_trunk(reply)``: a scalar head on the hidden
    state of the reply's last token plus a learned multiple of the reply's summed log-likelihood
    under the trunk's own language-model head. The trunk starts as the policy, whose
    likelihood separates right answers from sampled wrong ones far better than a fresh head
    learns to from a few hundred pairs; the head learns the users' style (docs/decisions.md,
    "Reward model: a learned likelihood term")."""

    offset: Tensor  # buffers (registered below): the raw-reward mean and spread
    scale: Tensor

    def __init__(self, trunk: PolicyModel, lm_weight: float = LM_WEIGHT_INIT) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(trunk.config.dim, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(trunk.config.dim))
        nn.init.zeros_(self.head.bias)
        # 0 = no likelihood term: the weight stays 0 and the LM head is not run
        self.with_likelihood = lm_weight != 0
        self.lm_weight = nn.Parameter(
            torch.tensor(float(lm_weight)), requires_grad=self.with_likelihood
        )
        self.register_buffer("offset", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))

    @classmethod
    def from_policy(cls, policy: PolicyModel, lm_weight: float = LM_WEIGHT_INIT) -> RewardModel:
        """A reward model whose trunk is a copy of ``policy``."""
        return cls(copy.deepcopy(policy).float().train(), lm_weight)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def head_parameters(self) -> list[nn.Parameter]:
        """What is not the trunk: the head and the likelihood weight (trained faster)."""
        return [*self.head.parameters(), self.lm_weight]

    def forward(self, tokens: Tensor, last: Tensor, mask: Tensor) -> Tensor:
        """Raw reward (B,): the head read at each row's last token (its ``<|end|>``) plus the
        likelihood term over the reply tokens that ``mask`` marks (see :class:`Batch`)."""
        hidden = self.trunk.hidden(tokens)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        reward = self.head(hidden[rows, last]).squeeze(-1).float()
        if not self.with_likelihood:
            return reward
        return reward + self.lm_weight * self.reply_log_likelihood(hidden, tokens, mask)

    def reply_log_likelihood(self, hidden: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        """Summed log-probability (B,) of the reply tokens ``mask`` marks, under the trunk's
        LM head, from the trunk's final ``hidden`` states."""
        return (token_logprobs(self.trunk.to_logits(hidden), tokens) * mask).sum(-1)

    @torch.no_grad()
    def score_encoded(self, seqs: Sequence[Encoded], pad_id: int, batch_size: int = 32) -> Tensor:
        """Normalised scores of encoded sequences, (N,) on the CPU."""
        out = []
        was = self.training
        self.eval()
        for start in range(0, len(seqs), batch_size):
            b = collate(seqs[start : start + batch_size], pad_id).to(self.device)
            out.append(((self(b.tokens, b.last, b.mask) - self.offset) / self.scale).cpu())
        self.train(was)
        return torch.cat(out) if out else torch.zeros(0)

    def score(
        self,
        tok: Tokenizer,
        prompts: Sequence[list[dict]],
        replies: Sequence[str],
        max_len: int = 256,
    ) -> Tensor:
        seqs = [encode_reply(tok, p, r, max_len) for p, r in zip(prompts, replies, strict=True)]
        return self.score_encoded(seqs, tok.pad_id)


# --------------------------------------------------------------------------- losses


def bt_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | float = 0.0) -> Tensor:
    """Bradley-Terry loss ``-log sigmoid(r_c - r_r - margin)``, mean over pairs."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


def pointwise_loss(rewards: Tensor, labels: Tensor) -> Tensor:
    """Logistic loss of thumbs: ``labels`` are +w (up) / -w (down), ``w`` the item's weight (1
    for a thumb; more for a labelled reply, :data:`shared.feedback_reader.LABEL_WEIGHTS`)."""
    return F.binary_cross_entropy_with_logits(rewards, (labels > 0).float(), weight=labels.abs())


def pair_accuracy(chosen: Tensor, rejected: Tensor) -> float:
    """Share of pairs ranked right; ties count half."""
    if chosen.numel() == 0:
        return float("nan")
    return float(((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean())


# --------------------------------------------------------------------------- training


@dataclass
class RewardReport:
    steps: int = 0
    train_pairs: int = 0
    train_thumbs: int = 0
    heldout_pairs: int = 0
    heldout_thumbs: int = 0
    train_loss: float = float("nan")
    train_accuracy: float = float("nan")
    heldout_accuracy: float | None = None  # pairwise, held-out prompts
    heldout_accuracy_decisive: float | None = None  # ... pairs whose thumbs agree with the order
    heldout_pairs_decisive: int = 0
    init: str = "policy"  # policy | a reward model version it continued from
    heldout_thumb_accuracy: float | None = None  # sign of the score vs the thumb
    offset: float = 0.0
    scale: float = 1.0
    lm_weight: float = 0.0  # the likelihood term's learned weight after training
    version: str | None = None
    history: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("history")
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def _encode_pairs(tok: Tokenizer, pairs: Sequence[Pair], max_len: int) -> list[tuple]:
    return [
        (
            encode_reply(tok, p.prompt, p.chosen, max_len),
            encode_reply(tok, p.prompt, p.rejected, max_len),
            p.margin,
        )
        for p in pairs
    ]


def _encode_thumbs(tok: Tokenizer, thumbs: Sequence[Thumb], max_len: int) -> list[tuple]:
    return [(encode_reply(tok, t.prompt, t.reply, max_len), t.label * t.weight) for t in thumbs]


@torch.no_grad()
def evaluate_reward_model(
    rm: RewardModel, tok: Tokenizer, data: FeedbackData, max_len: int = 192
) -> tuple[float | None, float | None, float | None]:
    """(pairwise accuracy, ... on decisive pairs, thumb accuracy) on ``data``; None where it
    has none. A pair is decisive when its chosen reply got a thumbs-up and the other a down:
    a ranking of two replies with the same thumb may order a tie arbitrarily."""
    pair_acc = decisive_acc = thumb_acc = None
    if data.pairs:
        enc = _encode_pairs(tok, data.pairs, max_len)
        c = rm.score_encoded([e[0] for e in enc], tok.pad_id)
        r = rm.score_encoded([e[1] for e in enc], tok.pad_id)
        pair_acc = pair_accuracy(c, r)
        keep = torch.tensor([p.decisive is True for p in data.pairs])
        if bool(keep.any()):
            decisive_acc = pair_accuracy(c[keep], r[keep])
    if data.thumbs:
        enc_t = _encode_thumbs(tok, data.thumbs, max_len)
        s = rm.score_encoded([e[0] for e in enc_t], tok.pad_id)
        labels = torch.tensor([e[1] for e in enc_t], dtype=torch.float)
        # the thumbs threshold is where the logistic head says 50%: raw reward 0
        raw = s * rm.scale.cpu() + rm.offset.cpu()
        thumb_acc = float(((raw > 0) == (labels > 0)).float().mean())
    return pair_acc, decisive_acc, thumb_acc


def train_reward_model(
    policy: PolicyModel,
    tok: Tokenizer,
    train: FeedbackData,
    heldout: FeedbackData,
    *,
    epochs: int = 2,
    max_steps: int | None = None,
    init: RewardModel | None = None,
    init_name: str = "policy",
    lr: float = 1e-4,
    batch_size: int = 16,
    pointwise_weight: float = 0.5,
    lm_weight: float = LM_WEIGHT_INIT,
    max_len: int = 192,
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    grad_clip: float = 1.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    info: DistInfo | None = None,
    progress: Progress | None = None,
) -> tuple[RewardModel, RewardReport]:
    """Train a reward model on the pairs and thumbs of ``train``: initialised from
    ``policy``'s trunk (likelihood term weight ``lm_weight``), or continuing from ``init`` (an
    earlier round's reward model, its weight included)."""
    info = info or DistInfo()
    if init is not None:
        rm = copy.deepcopy(init).to(policy.device).train()
    else:
        rm, init_name = RewardModel.from_policy(policy, lm_weight).to(policy.device), "policy"
        _center_likelihood_term(rm, _encode_thumbs(tok, train.thumbs[:256], max_len), tok.pad_id)
    params = list(rm.parameters())
    if lora_rank:
        params = apply_lora(rm.trunk, lora_rank, lora_alpha) + rm.head_parameters()
    pairs = _encode_pairs(tok, train.pairs, max_len)
    thumbs = _encode_thumbs(tok, train.thumbs, max_len) if pointwise_weight > 0 else []
    report = RewardReport(
        train_pairs=len(pairs),
        train_thumbs=len(thumbs),
        heldout_pairs=len(heldout.pairs),
        heldout_thumbs=len(heldout.thumbs),
        heldout_pairs_decisive=sum(p.decisive is True for p in heldout.pairs),
        init=init_name,
    )
    my_pairs, my_thumbs = shard(pairs, info, seed), shard(thumbs, info, seed + 1)
    per_step = batch_size * info.world
    steps = epochs * max(math.ceil(len(pairs) / per_step), math.ceil(len(thumbs) / per_step))
    if max_steps is not None:
        steps = min(steps, max_steps)
    model = wrap_ddp(rm, info)
    head = {id(p) for p in rm.head_parameters()}
    groups: list[dict[str, Any]] = [
        {"params": [p for p in params if p.requires_grad and id(p) not in head]},
        # the fresh head learns faster than the pretrained trunk
        {"params": [*rm.head.parameters()], "lr": lr * 10},
        {
            "params": [p for p in (rm.lm_weight,) if p.requires_grad],
            "lr": LM_WEIGHT_LR,
            "weight_decay": 0.0,
        },
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    device = rm.device
    losses, accs = [], []
    rm.train()
    for step in range(steps):
        pb = _cycle(my_pairs, step, batch_size, seed)
        tb = _cycle(my_thumbs, step, batch_size, seed + 1)
        seqs = [x for c, r, _ in pb for x in (c, r)] + [t for t, _ in tb]
        if not seqs:
            break
        b = collate(seqs, tok.pad_id).to(device)
        rewards = model(b.tokens, b.last, b.mask)
        loss = rewards.sum() * 0.0
        if pb:
            chosen, rejected = rewards[0 : 2 * len(pb) : 2], rewards[1 : 2 * len(pb) : 2]
            margin = torch.tensor([m for _, _, m in pb], device=device)
            loss = loss + bt_loss(chosen, rejected, margin)
            accs.append(pair_accuracy(chosen.detach(), rejected.detach()))
        if tb:
            labels = torch.tensor([lab for _, lab in tb], device=device, dtype=torch.float)
            loss = loss + pointwise_weight * pointwise_loss(rewards[2 * len(pb) :], labels)
        optimizer_step(opt, loss, params, grad_clip)
        losses.append(loss.item())
        if progress is not None:
            progress(
                "reward model", step + 1, steps, f"loss {sum(losses[-20:]) / len(losses[-20:]):.3f}"
            )
    if lora_rank:
        merge_lora(rm.trunk)
    rm.eval()
    _normalise(
        rm, [x for c, r, _ in pairs for x in (c, r)] + [t for t, _ in thumbs], tok.pad_id, info
    )
    report.steps = steps
    report.history = losses
    if losses:
        report.train_loss = all_mean([sum(losses[-20:]) / len(losses[-20:])], info)[0]
    if accs:
        report.train_accuracy = all_mean([sum(accs[-20:]) / len(accs[-20:])], info)[0]
    (
        report.heldout_accuracy,
        report.heldout_accuracy_decisive,
        report.heldout_thumb_accuracy,
    ) = evaluate_reward_model(rm, tok, heldout, max_len)
    report.offset, report.scale = float(rm.offset), float(rm.scale)
    report.lm_weight = float(rm.lm_weight.detach())
    return rm, report


def _cycle(items: list, step: int, batch_size: int, seed: int) -> list:
    """Batch ``step`` of an endless pass over ``items``, reshuffled every epoch."""
    if not items:
        return []
    per_epoch = max(1, math.ceil(len(items) / batch_size))
    epoch, index = divmod(step, per_epoch)
    order = list(range(len(items)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [items[i] for i in order[index * batch_size : (index + 1) * batch_size]]


@torch.no_grad()
def _center_likelihood_term(rm: RewardModel, thumbs: list[tuple], pad_id: int) -> None:
    """Start a fresh head's bias at minus the likelihood term's mean on (some) thumbed replies,
    so the thumbs' logistic loss starts near its balance point instead of pulling every
    reward up by the term's (large, negative) offset."""
    if not thumbs or not rm.with_likelihood:
        return
    was = rm.training
    rm.eval()
    terms = []
    for start in range(0, len(thumbs), 32):
        b = collate([t for t, _ in thumbs[start : start + 32]], pad_id).to(rm.device)
        logp = rm.reply_log_likelihood(rm.trunk.hidden(b.tokens), b.tokens, b.mask)
        terms.append(rm.lm_weight * logp)
    rm.head.bias.fill_(-float(torch.cat(terms).mean()))
    rm.train(was)


@torch.no_grad()
def _normalise(rm: RewardModel, seqs: list[Encoded], pad_id: int, info: DistInfo) -> None:
    """Set offset/scale to the mean/std of raw rewards on (up to 512 of) the training replies."""
    rm.offset.zero_()
    rm.scale.fill_(1.0)
    if not seqs:
        return
    sample = seqs if len(seqs) <= 512 else random.Random(0).sample(seqs, 512)
    raw = rm.score_encoded(sample, pad_id)
    mean, sq = all_mean([float(raw.mean()), float((raw**2).mean())], info)
    rm.offset.fill_(mean)
    rm.scale.fill_(max(math.sqrt(max(sq - mean**2, 0.0)), 1e-3))


# --------------------------------------------------------------------------- artifacts


class RewardRegistry(VersionDirectory):
    """Versioned reward models: ``<root>/vN/{model.safetensors, tokenizer.json, manifest.json}``,
    published and verified as policy versions are (:mod:`shared.checkpoints`)."""

    kind = "reward model"

    def publish(
        self,
        rm: RewardModel,
        tok: Tokenizer,
        *,
        policy_version: str | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> str:
        with staging_dir(self.root) as tmp:
            state = {f"trunk.{k}": v for k, v in rm.trunk.state_dict_for_save().items()}
            state.update({f"head.{k}": v for k, v in rm.head.state_dict().items()})
            state["offset"], state["scale"] = rm.offset, rm.scale
            state["lm_weight"] = rm.lm_weight
            save_file(
                {k: v.detach().cpu().float().contiguous() for k, v in state.items()},
                str(tmp / MODEL_FILE),
                metadata={"format": FORMAT},
            )
            tok.save(tmp / TOKENIZER_FILE)
            manifest = {
                "format": FORMAT,
                "created_at": datetime.now(UTC).isoformat(),
                "policy_version": policy_version,
                "family": rm.trunk.family,
                "config": rm.trunk.config.to_dict(),
                "files": file_entries(tmp),
                "metrics": dict(metrics or {}),
            }
            return commit_version_dir(self.root, tmp, manifest)

    def load(self, version: str, device: str = "cpu") -> tuple[RewardModel, Tokenizer, dict]:
        """The verified version (a :class:`CheckpointError` names a damaged file)."""
        path = self.path(version)
        manifest = verify_version_dir(path, version, manifest_format=FORMAT, kind=self.kind)
        state = load_file(str(path / MODEL_FILE))
        # a manifest without a family is PaLM's (every one before the Llama family)
        trunk = build_model(config_from_dict(family_of(manifest), manifest["config"]))
        trunk.load_saved_state({k[6:]: v for k, v in state.items() if k.startswith("trunk.")})
        rm = RewardModel(trunk, float(state["lm_weight"]))
        rm.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        rm.offset.copy_(state["offset"])
        rm.scale.copy_(state["scale"])
        return rm.to(device).eval(), load_tokenizer(path / TOKENIZER_FILE), manifest
