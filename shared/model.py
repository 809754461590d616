"""PaLM: the policy architecture served and trained by palmchat.

Parallel attention + feed-forward blocks from one fused projection, multi-query attention (one
shared key/value head), SwiGLU, rotary embeddings with xpos, LayerNorm without bias, no biases,
and a tied input/output embedding. Parameter and buffer names match lucidrains'
``palm_rlhf_pytorch.PaLM`` so its ``state_dict`` loads here directly.

Unlike that reference, ``forward`` takes token positions and an optional KV cache, so a ragged
batch of prompts can be prefilled at once and then decoded one token per step::

    model = PaLM(PaLMConfig.from_name("tiny", num_tokens=512))
    cache = KVCache.allocate(model.config, batch=2, max_len=64)
    logits = model(tokens, positions, cache)            # prefill (B, T)
    logits = model(next_tokens, next_positions, cache)  # decode (B, 1)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(dim=128, depth=2, heads=4, dim_head=32),
    "small": dict(dim=256, depth=6, heads=8, dim_head=32),
    "base": dict(dim=512, depth=8, heads=8, dim_head=64),
}


@dataclass(slots=True)
class PaLMConfig:
    num_tokens: int
    dim: int
    depth: int
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    qk_rmsnorm: bool = False
    xpos_scale_base: int = 512
    max_seq_len: int = 1024

    def __post_init__(self) -> None:
        for name in ("num_tokens", "dim", "depth", "heads", "dim_head", "ff_mult", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"PaLMConfig.{name} must be positive, got {getattr(self, name)}")
        if self.dim_head % 2:
            raise ValueError(f"PaLMConfig.dim_head must be even for rotary, got {self.dim_head}")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> PaLMConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown PaLM preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PaLMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown PaLMConfig fields: {sorted(unknown)}")
        return cls(**data)

    @property
    def ff_inner_dim(self) -> int:
        return self.dim * self.ff_mult


class AttentionCache(Protocol):
    """What a block needs from a KV cache: store this step's k/v, return what to attend to."""

    def update(
        self, layer: int, k: Tensor, v: Tensor, positions: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Store ``k, v`` (B, T, dh) at ``positions`` (B, T); return keys, values (B, S, dh) and a
        boolean mask (B, 1, T, S) of which keys each query may see."""
        ...


@dataclass
class KVCache:
    """Contiguous per-sequence cache: slot ``p`` of row ``b`` holds the key/value at position p.

    Multi-query attention keeps one k/v head, so a layer's cache is only (B, S, dim_head).
    """

    k: Tensor  # (L, B, S, dh)
    v: Tensor  # (L, B, S, dh)

    @classmethod
    def allocate(
        cls,
        config: PaLMConfig,
        batch: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        shape = (config.depth, batch, max_len, config.dim_head)
        zeros = torch.zeros(shape, device=device, dtype=dtype)
        return cls(zeros, zeros.clone())

    def update(
        self, layer: int, k: Tensor, v: Tensor, positions: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        index = positions.unsqueeze(-1).expand(-1, -1, k.shape[-1])
        self.k[layer].scatter_(1, index, k.to(self.k.dtype))
        self.v[layer].scatter_(1, index, v.to(self.v.dtype))
        slots = torch.arange(self.k.shape[2], device=k.device)
        # A query at position p sees slots 0..p; slots past a row's length hold stale values
        # that a later write overwrites before any query can reach them.
        mask = slots.view(1, 1, 1, -1) <= positions.view(*positions.shape[:2], 1).unsqueeze(1)
        return self.k[layer], self.v[layer], mask


class LayerNorm(nn.Module):
    """LayerNorm without bias; ``gamma`` is stored as an offset from 1 (as in the reference)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma + 1, self.beta)


class RotaryEmbedding(nn.Module):
    """Rotary embedding with xpos length-extrapolation decay.

    https://arxiv.org/abs/2104.09864, https://arxiv.org/abs/2212.10554
    The reference centres the xpos exponent on the sequence middle; queries get scale**e and
    keys scale**-e, so any offset cancels in q.k and absolute positions give the same scores.
    """

    def __init__(self, dim_head: int, scale_base: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim_head, 2).float() / dim_head))
        self.register_buffer("inv_freq", inv_freq)
        self.register_buffer(
            "scale", (torch.arange(0, dim_head, 2) + 0.4 * dim_head) / (1.4 * dim_head)
        )
        self.scale_base = scale_base

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t = positions.to(self.inv_freq.dtype).unsqueeze(-1)  # (B, T, 1)
        freqs = t * self.inv_freq  # (B, T, dh/2)
        scale = self.scale ** (t / self.scale_base)
        freqs, scale = torch.cat((freqs, freqs), dim=-1), torch.cat((scale, scale), dim=-1)
        return freqs.cos(), freqs.sin(), scale


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, scale: Tensor) -> Tensor:
    return (x * cos * scale) + (rotate_half(x) * sin * scale)


class SwiGLU(nn.Module):
    """https://arxiv.org/abs/2002.05202"""

    def forward(self, x: Tensor) -> Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


class ParallelTransformerBlock(nn.Module):
    """Attention and feed-forward computed in parallel from one fused input projection."""

    def __init__(self, config: PaLMConfig) -> None:
        super().__init__()
        c = config
        self.heads, self.dim_head, self.qk_rmsnorm = c.heads, c.dim_head, c.qk_rmsnorm
        self.norm = LayerNorm(c.dim)
        attn_inner = c.heads * c.dim_head
        self.fused_dims = (attn_inner, c.dim_head, c.dim_head, c.ff_inner_dim * 2)
        if c.qk_rmsnorm:
            self.q_scale = nn.Parameter(torch.ones(c.dim_head))
            self.k_scale = nn.Parameter(torch.ones(c.dim_head))
        self.rotary_emb = RotaryEmbedding(c.dim_head, c.xpos_scale_base)
        self.fused_attn_ff_proj = nn.Linear(c.dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(attn_inner, c.dim, bias=False)
        # index 1 is the reference's (no-op) dropout; kept so state_dict keys match
        self.ff_out = nn.Sequential(
            SwiGLU(), nn.Identity(), nn.Linear(c.ff_inner_dim, c.dim, bias=False)
        )

    def forward(
        self, x: Tensor, positions: Tensor, cache: AttentionCache | None, layer: int
    ) -> Tensor:
        b, n, _ = x.shape
        x = self.norm(x)
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.fused_dims, dim=-1)
        q = q.view(b, n, self.heads, self.dim_head).transpose(1, 2)  # (B, H, T, dh)
        if self.qk_rmsnorm:
            q = F.normalize(q, dim=-1) * self.q_scale
            k = F.normalize(k, dim=-1) * self.k_scale
        cos, sin, scale = self.rotary_emb(positions)  # (B, T, dh)
        q = apply_rotary(q, cos.unsqueeze(1), sin.unsqueeze(1), scale.unsqueeze(1))
        k = apply_rotary(k, cos, sin, scale.reciprocal())  # (B, T, dh)
        return self._attend_and_project(q, k, v, ff, positions, cache, layer)

    def forward_step(
        self, x: Tensor, rotary: Rotary, positions: Tensor, cache: AttentionCache, layer: int
    ) -> Tensor:
        """``forward`` for the serving engine: rotary tables precomputed once for all layers and
        applied to queries and the key in one go. A cache with an ``attend(layer, q, k, v,
        positions)`` method (q (B, T, H, dh), k and v (B, T, dh); returns (B, T, H * dh))
        computes the attention itself, e.g. straight from paged blocks; otherwise
        ``update`` + SDPA as in ``forward``."""
        b, n, _ = x.shape
        h, dh = self.heads, self.dim_head
        qk, v, ff = self.fused_attn_ff_proj(self.norm(x)).split(
            (h * dh + dh, dh, self.fused_dims[3]), dim=-1
        )
        qk = qk.view(b, n, h + 1, dh)
        if self.qk_rmsnorm:
            scales = torch.cat((self.q_scale.expand(h, dh), self.k_scale.unsqueeze(0)))
            qk = F.normalize(qk, dim=-1) * scales
        # rotate_half(x) == x.roll(dh / 2) * [-1.., +1..]; the sign is folded into rotary.sin
        qk = torch.addcmul(qk * rotary.cos, qk.roll(dh // 2, dims=-1), rotary.sin)
        q, k = qk[:, :, :h], qk[:, :, h]
        attend = getattr(cache, "attend", None)
        if attend is None:
            return self._attend_and_project(q.transpose(1, 2), k, v, ff, positions, cache, layer)
        out = attend(layer, q, k, v, positions)
        return self.attn_out(out) + self.ff_out(ff)

    def _attend_and_project(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        ff: Tensor,
        positions: Tensor,
        cache: AttentionCache | None,
        layer: int,
    ) -> Tensor:
        b, _, n, _ = q.shape
        if cache is None:
            out = F.scaled_dot_product_attention(
                q,
                k.unsqueeze(1).expand(-1, self.heads, -1, -1),
                v.unsqueeze(1).expand(-1, self.heads, -1, -1),
                is_causal=True,
            )
        else:
            keys, values, mask = cache.update(layer, k, v, positions)
            out = F.scaled_dot_product_attention(
                q,
                keys.unsqueeze(1).expand(-1, self.heads, -1, -1),
                values.unsqueeze(1).expand(-1, self.heads, -1, -1),
                attn_mask=mask,
            )
        out = out.transpose(1, 2).reshape(b, n, -1)  # (B, T, H*dh)
        return self.attn_out(out) + self.ff_out(ff)


@dataclass(slots=True)
class Rotary:
    """Rotary tables for queries and the key together, (B, T, heads + 1, dh): the xpos scale
    folded in (scale for the queries, 1/scale for the key) and ``sin`` signed so that
    ``rotate_half(x) * sin == x.roll(dh / 2) * rotary.sin``."""

    cos: Tensor
    sin: Tensor

    @classmethod
    def at(
        cls, rotary_emb: RotaryEmbedding, positions: Tensor, heads: int, dtype: torch.dtype
    ) -> Rotary:
        cos, sin, scale = rotary_emb(positions)  # (B, T, dh), in the buffers' precision
        half = cos.shape[-1] // 2
        sign = torch.ones_like(cos[0, 0])
        sign[:half] = -1
        sin = sin * sign
        inv = scale.reciprocal()
        b, t, dh = cos.shape
        q_cos = (cos * scale).unsqueeze(2).expand(b, t, heads, dh)
        q_sin = (sin * scale).unsqueeze(2).expand(b, t, heads, dh)
        return cls(
            torch.cat((q_cos, (cos * inv).unsqueeze(2)), dim=2).to(dtype),
            torch.cat((q_sin, (sin * inv).unsqueeze(2)), dim=2).to(dtype),
        )


class Residual(nn.Module):
    def __init__(self, fn: ParallelTransformerBlock) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, *args: Any) -> Tensor:
        return x + self.fn(x, *args)


class PaLM(nn.Module):
    def __init__(self, config: PaLMConfig) -> None:
        super().__init__()
        self.config = config
        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        self.layers = nn.ModuleList(
            [Residual(ParallelTransformerBlock(config)) for _ in range(config.depth)]
        )
        self.norm = LayerNorm(config.dim)
        self.to_logits = nn.Linear(config.dim, config.num_tokens, bias=False)
        self.to_logits.weight = self.token_emb.weight
        nn.init.normal_(self.token_emb.weight, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.token_emb.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden(
        self, tokens: Tensor, positions: Tensor | None = None, cache: AttentionCache | None = None
    ) -> Tensor:
        """Final normed hidden states (B, T, dim): the trunk that reward and value heads share.

        Without a cache the batch is causal over ``tokens`` with positions 0..T-1 (right-padded
        rows are fine: padding only follows real tokens). With a cache, ``positions`` (B, T)
        say where each token sits; the cache holds everything before it.
        """
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required with a KV cache")
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.token_emb(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, cache, i)
        return self.norm(x)

    def forward(
        self, tokens: Tensor, positions: Tensor | None = None, cache: AttentionCache | None = None
    ) -> Tensor:
        return self.to_logits(self.hidden(tokens, positions, cache))  # (B, T, V)

    def forward_step(
        self, tokens: Tensor, positions: Tensor, cache: AttentionCache, last: Tensor | None = None
    ) -> Tensor:
        """Logits for a serving step: ``tokens`` and ``positions`` (B, T) with a cache.

        Positions must be below ``config.max_seq_len`` (rotary tables are precomputed up to
        there). With ``last`` (B,) only the logits at those indices along T are computed,
        (B, V) - all a sampler needs after a prefill.
        """
        x = self.token_emb(tokens)
        cos, sin = self._rotary_tables(x.dtype)
        rotary = Rotary(cos[positions], sin[positions])
        for i, layer in enumerate(self.layers):
            x = x + layer.fn.forward_step(x, rotary, positions, cache, i)
        if last is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last]
        elif x.shape[1] == 1:
            x = x[:, 0]
        return self.to_logits(self.norm(x))

    def _rotary_tables(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``Rotary`` tables of every position below ``max_seq_len``, (S, heads + 1, dh); built
        once per dtype and device (the rotary buffers are constants of the config)."""
        key = (dtype, self.device)
        cached = self.__dict__.get("_rotary_cache")
        if cached is None or cached[0] != key:
            block = self.layers[0].fn
            positions = torch.arange(self.config.max_seq_len, device=self.device).unsqueeze(0)
            rotary = Rotary.at(block.rotary_emb, positions, block.heads, dtype)
            cached = (key, rotary.cos[0], rotary.sin[0])
            self.__dict__["_rotary_cache"] = cached
        return cached[1], cached[2]

    def state_dict_for_save(self) -> dict[str, Tensor]:
        """State dict without the tied output weight (safetensors refuses shared storage)."""
        return {k: v.contiguous() for k, v in self.state_dict().items() if k != "to_logits.weight"}

    def load_saved_state(self, state: dict[str, Tensor]) -> None:
        state = dict(state)
        state.setdefault("to_logits.weight", state["token_emb.weight"])
        self.load_state_dict(state, strict=True)
