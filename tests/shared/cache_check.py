"""The largest logit gap between cached decoding (ragged prefill, then a token a step) and full."""

from __future__ import annotations

import torch
from torch import nn

from shared.model import KVCache


def worst_cached_error(model: nn.Module, tokens: torch.Tensor, prompt_lens: list[int]) -> float:
    """Prefill each row's first ``prompt_lens[b]`` tokens right-padded in one batch, decode the
    rest one token per step, and compare every position's logits with one causal forward."""
    batch, total = tokens.shape
    with torch.no_grad():
        full = model(tokens)  # (B, T, V): causal, so row b at t only sees tokens[b, :t+1]
        cache = KVCache.allocate(model.config, batch, max_len=total + 8)
        width = max(prompt_lens)
        prompts = torch.zeros(batch, width, dtype=torch.long)  # right-padded ragged prompts
        for b, n in enumerate(prompt_lens):
            prompts[b, :n] = tokens[b, :n]
        logits = model(prompts, torch.arange(width).expand(batch, width), cache)
        worst = max(
            (logits[b, :n] - full[b, :n]).abs().max().item() for b, n in enumerate(prompt_lens)
        )
        lengths = torch.tensor(prompt_lens)
        while int(lengths.max()) < total:
            pos = lengths.clamp(max=total - 1)
            step = model(tokens[torch.arange(batch), pos].unsqueeze(1), pos.unsqueeze(1), cache)
            for b in range(batch):
                if lengths[b] < total:
                    worst = max(worst, (step[b, 0] - full[b, pos[b]]).abs().max().item())
            lengths = lengths + 1
    return worst
