"""Batched generation with a KV cache, for the CLI chat and offline evaluation.

One ragged prefill of every prompt, then one decode step per new token for the whole batch
(gpt-fast's ``prefill`` / ``decode_one_token`` split). The serving engine adds continuous
batching and a paged cache on top; this is the simple, whole-batch form.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from shared.model import KVCache, PaLM
from shared.tokenizer import Tokenizer, apply_chat_template


def sample_next(
    logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """Pick one token per row from (B, V) logits; temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop tokens once the mass before them already reaches top_p (the first always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(
    model: PaLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[list[int]]:
    """Continue each prompt until ``stop_id`` (not returned) or ``max_new_tokens``."""
    device = model.device
    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    if batch == 0:
        return []
    if int(lengths.min()) < 1:
        raise ValueError("every prompt needs at least one token")
    limit = model.config.max_seq_len
    max_new_tokens = min(max_new_tokens, limit - int(lengths.max()))
    if max_new_tokens < 1:
        raise ValueError(f"prompt too long for the model's context of {limit} tokens")
    width = int(lengths.max())
    tokens = torch.zeros(batch, width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(list(p), device=device)
    dtype = next(model.parameters()).dtype
    cache = KVCache.allocate(model.config, batch, width + max_new_tokens, device, dtype)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    logits = model(tokens, torch.arange(width, device=device).expand(batch, width), cache)
    last = logits[torch.arange(batch, device=device), lengths - 1]
    out: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        nxt = sample_next(last, temperature, top_p, generator)
        for i in (~done).nonzero().flatten().tolist():
            if int(nxt[i]) == stop_id:
                done[i] = True
            else:
                out[i].append(int(nxt[i]))
        if bool(done.all()):
            break
        last = model(nxt.unsqueeze(1), lengths.unsqueeze(1), cache)[:, 0]
        lengths = lengths + 1
    return out


def generate_replies(
    model: PaLM,
    tokenizer: Tokenizer,
    conversations: Sequence[list[dict]],
    *,
    max_new_tokens: int = 96,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    batch_size: int = 32,
) -> list[str]:
    """Answer each conversation (the chat template adds the assistant turn)."""
    replies: list[str] = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start : start + batch_size]
        prompts = [apply_chat_template(tokenizer, c, add_generation_prompt=True) for c in chunk]
        ids = generate_ids(
            model,
            prompts,
            max_new_tokens=max_new_tokens,
            stop_id=tokenizer.end_id,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        replies.extend(tokenizer.decode(x) for x in ids)
    return replies
