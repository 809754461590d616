"""Pieces every trainer algorithm shares: encoding (prompt, reply) pairs, per-token
log-probabilities of a reply, optimisers, and the process group for ``torchrun`` (DDP over gloo
on CPU, nccl on GPU).

A sequence is ``chat_template(prompt) + encode(reply) + <|end|>``; the reply's tokens (with its
``<|end|>``) are the *response*: what the policy chose, what rewards and losses are about.
"""

from __future__ import annotations

import copy
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from shared.families import PolicyModel
from shared.messages import ChatMessages
from shared.tokenizer import Tokenizer, apply_chat_template

# what the phases report while they run: (phase, done, total, text)
Progress = Callable[[str, int, int, str], None]


# --------------------------------------------------------------------------- encoding


@dataclass
class Encoded:
    """Token ids of one sequence and where its response starts."""

    ids: list[int]
    start: int  # index of the first response token in ``ids``

    @property
    def response_len(self) -> int:
        return len(self.ids) - self.start


def encode_reply(
    tok: Tokenizer, prompt: ChatMessages, reply: str | Sequence[int], max_len: int, end: bool = True
) -> Encoded:
    """``prompt`` rendered for generation followed by ``reply`` (text, or ids as generated)
    and ``<|end|>``. Too long: the prompt loses tokens from its start, then the reply its end."""
    prompt_ids = apply_chat_template(tok, prompt, add_generation_prompt=True)
    response = tok.encode(reply) if isinstance(reply, str) else list(reply)
    if end:
        response = [*response, tok.end_id]
    response = response[: max(1, max_len - 2)]
    keep = max(1, max_len - len(response))
    prompt_ids = prompt_ids[-keep:]
    return Encoded(prompt_ids + response, len(prompt_ids))


@dataclass
class Batch:
    """Right-padded sequences. ``mask[b, t]`` marks ``tokens[b, t + 1]`` as a response token,
    so it lines up with the logits at position ``t`` (which predict token ``t + 1``)."""

    tokens: Tensor  # (B, T)
    mask: Tensor  # (B, T - 1) float
    last: Tensor  # (B,) index of each row's last token

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.tokens.to(device), self.mask.to(device), self.last.to(device))


def collate(seqs: Sequence[Encoded], pad_id: int) -> Batch:
    width = max(len(s.ids) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), max(width - 1, 1))
    for i, s in enumerate(seqs):
        tokens[i, : len(s.ids)] = torch.tensor(s.ids)
        mask[i, s.start - 1 : len(s.ids) - 1] = 1.0
    last = torch.tensor([len(s.ids) - 1 for s in seqs])
    return Batch(tokens, mask, last)


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log p(tokens[:, t + 1] | ...) from ``logits`` (B, T, V) -> (B, T - 1)."""
    logits = logits[:, :-1].float()
    targets = tokens[:, 1:]
    return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


def entropy_of(logits: Tensor) -> Tensor:
    """Entropy of each position's next-token distribution, (B, T, V) -> (B, T - 1)."""
    logits = logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def sequence_logprobs(model: nn.Module, batch: Batch) -> Tensor:
    """Sum of response-token log-probs per row, (B,)."""
    return (token_logprobs(model(batch.tokens), batch.tokens) * batch.mask).sum(-1)


@torch.no_grad()
def batched_sequence_logprobs(
    model: PolicyModel, seqs: Sequence[Encoded], pad_id: int, batch_size: int = 32
) -> Tensor:
    out = []
    for start in range(0, len(seqs), batch_size):
        batch = collate(seqs[start : start + batch_size], pad_id).to(model.device)
        out.append(sequence_logprobs(model, batch).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def adamw(params: Sequence[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)


def optimizer_step(
    opt: torch.optim.Optimizer, loss: Tensor, params: Sequence[nn.Parameter], grad_clip: float
) -> None:
    """One update: fresh gradients of ``loss``, clipped to ``grad_clip`` in global norm."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU,
    nccl on CUDA); a single process without ``WORLD_SIZE`` gets rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local)


def close_distributed(info: DistInfo) -> None:
    """Leave the process group before the interpreter exits: its threads (and FSDP2's
    communication state) torn down at exit instead abort a rank now and then."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: str, info: DistInfo) -> str:
    if device.startswith("cuda") and info.enabled:
        return f"cuda:{info.local_rank}"
    return device


def broadcast_json(obj: object, info: DistInfo, device: str = "cpu") -> object:
    """Rank 0's JSON-able ``obj`` on every rank (JSON over a byte tensor: no pickle)."""
    if not info.enabled:
        return obj
    dev = torch.device(device if device.startswith("cuda") else "cpu")
    if info.is_main:
        payload = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=dev)
        size = torch.tensor([payload.numel()], dtype=torch.long, device=dev)
    else:
        size = torch.zeros(1, dtype=torch.long, device=dev)
    dist.broadcast(size, 0)
    if not info.is_main:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
    dist.broadcast(payload, 0)
    return json.loads(bytes(payload.cpu().tolist()).decode())


def all_mean(values: Sequence[float], info: DistInfo, device: str = "cpu") -> list[float]:
    """Element-wise mean of ``values`` over ranks."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / info.world).tolist()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shard(items: Sequence, info: DistInfo, seed: int) -> list:
    """This rank's equal share of ``items`` after a shuffle every rank agrees on."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    if info.enabled and len(order) >= info.world:
        per = len(order) // info.world
        order = order[info.rank * per : (info.rank + 1) * per]
    return [items[i] for i in order]


def wrap_sharded(module: nn.Module, info: DistInfo) -> nn.Module:
    """A copy of ``module`` sharded over the processes with FSDP2, each block (the members of
    a ``layers`` list) its own unit: its weights, gradients and optimiser state are split,
    and a block's weights are gathered only while it runs. ``module`` waits on the CPU with
    its weights as they were; :func:`gather_trained` copies the trained weights back and
    returns it to the device. Unsharded when not distributed."""
    if not info.enabled:
        return module
    from torch.distributed.fsdp import fully_shard

    sharded = copy.deepcopy(module)
    for name, child in sharded.named_modules():
        if isinstance(child, nn.ModuleList) and name.rpartition(".")[2] == "layers":
            for block in child:
                fully_shard(block)
    fully_shard(sharded)
    module.to("cpu")  # the whole weights off the accelerator while the shards train
    return sharded


def gather_trained(model: nn.Module, module: nn.Module) -> None:
    """After training ``model`` made by :func:`wrap_sharded`: its whole weights, gathered
    from every process, into ``module`` (on every process). Nothing to do for ``module``."""
    if model is module:
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    module.load_state_dict(full)
    module.to(next(model.parameters()).device)  # back where it came from


def wrap_ddp(module: nn.Module, info: DistInfo) -> nn.Module:
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.local_rank] if next(module.parameters()).is_cuda else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)
