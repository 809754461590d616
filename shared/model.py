"""PaLM: the policy architecture served and trained by palmchat.

Parallel attention + feed-forward blocks from one fused projection, multi-query attention (one
shared key/value head), SwiGLU, rotary embeddings with xpos, LayerNorm without bias, no biases,
and a tied input/output embedding. Parameter and buffer names match lucidrains'
``palm_rlhf_pytorch.PaLM`` so its ``state_dict`` loads here directly.

Unlike that reference, ``forward`` takes token positions and an optional KV cache (anything
with the :class:`AttentionCache` method), so a ragged batch of prompts can be prefilled at once
and then decoded one token per step; training, the reference comparison and the serving engine
all run this one forward, with rotary tables precomputed once per dtype and device::

    model = PaLM(PaLMConfig.from_name("tiny", num_tokens=512))
    logits = model(tokens)                              # training: causal, (B, T, V)
    cache = KVCache.allocate(model.config, batch=2, max_len=64)
    logits = model(tokens, positions, cache)            # prefill (B, T)
    logits = model(next_tokens, next_positions, cache)  # decode (B, 1)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(dim=128, depth=2, heads=4, dim_head=32),
    "small": dict(dim=256, depth=6, heads=8, dim_head=32),
    "base": dict(dim=512, depth=8, heads=8, dim_head=64),
    # ~1.0B parameters with a 32k vocabulary: for pretraining and benchmarks on a GPU
    "1b": dict(dim=2048, depth=16, heads=16, dim_head=128),
}


ConfigT = TypeVar("ConfigT")


def strict_from_dict(cls: type[ConfigT], data: dict[str, Any]) -> ConfigT:
    """``cls(**data)`` for a config dataclass, refusing keys it has no field for by name."""
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**data)


def require_positive(config: object, names: tuple[str, ...], label: str = "") -> None:
    """A clear ValueError naming the first of ``names`` that is not at least 1."""
    for name in names:
        if getattr(config, name) < 1:
            raise ValueError(f"{label}{name} must be positive, got {getattr(config, name)}")


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
        return strict_from_dict(cls, data)

    @property
    def ff_inner_dim(self) -> int:
        return self.dim * self.ff_mult

    @property
    def kv_heads(self) -> int:
        """Key/value heads per layer: multi-query attention shares one."""
        return 1


class CacheShape(Protocol):
    """What a KV cache needs to know of a model family's config."""

    @property
    def depth(self) -> int: ...
    @property
    def kv_heads(self) -> int: ...
    @property
    def dim_head(self) -> int: ...
    @property
    def max_seq_len(self) -> int: ...


class AttentionCache(Protocol):
    """A KV cache that a forward attends through: a contiguous :class:`KVCache`, or the serving
    engine's paged pool (``server/engine/kv_cache.py``) and its fixed-shape decode step."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """Store this forward's keys and values k, v (B, T, Hkv, dh) of ``layer`` at
        ``positions`` (B, T); return the attention of the queries q (B, T, H, dh) over every key
        each one may see, the new ones included, as (B, T, H * dh). Query head i reads key/value
        head i // (H / Hkv) (grouped-query attention; PaLM's multi-query attention is Hkv = 1)."""
        ...


def attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Grouped-query attention of q (B, T, H, dh) over Hkv key/value heads (B, S, Hkv, dh), H a
    multiple of Hkv: with a boolean ``mask`` (B, 1, T, S) of the keys each query sees, else
    causal (S == T). Returns (B, T, H * dh)."""
    b, t, h, dh = q.shape
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # (B, Hkv, S, dh)
    if keys.shape[1] == 1:  # one shared head: a broadcast view, no copy per query head
        keys, values = keys.expand(-1, h, -1, -1), values.expand(-1, h, -1, -1)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),  # (B, H, T, dh)
        keys,
        values,
        attn_mask=mask,
        is_causal=mask is None,
        enable_gqa=keys.shape[1] != h,
    )
    return out.transpose(1, 2).reshape(b, t, h * dh)


@dataclass
class KVCache:
    """Contiguous per-sequence cache: slot ``p`` of row ``b`` holds the key/value at position p.

    A layer's cache holds the config's ``kv_heads`` heads: (B, S, Hkv, dh); PaLM's multi-query
    attention keeps only one.
    """

    k: Tensor  # (L, B, S, Hkv, dh)
    v: Tensor  # (L, B, S, Hkv, dh)

    @classmethod
    def allocate(
        cls,
        config: CacheShape,
        batch: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        shape = (config.depth, batch, max_len, config.kv_heads, config.dim_head)
        zeros = torch.zeros(shape, device=device, dtype=dtype)
        return cls(zeros, zeros.clone())

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        index = positions.view(*positions.shape, 1, 1).expand_as(k)
        self.k[layer].scatter_(1, index, k.to(self.k.dtype))
        self.v[layer].scatter_(1, index, v.to(self.v.dtype))
        slots = torch.arange(self.k.shape[2], device=k.device)
        # A query at position p sees slots 0..p; slots past a row's length hold stale values
        # that a later write overwrites before any query can reach them.
        mask = slots.view(1, 1, 1, -1) <= positions.view(*positions.shape[:2], 1).unsqueeze(1)
        return attention(q, self.k[layer], self.v[layer], mask)


class LayerNorm(nn.Module):
    """LayerNorm without bias; ``gamma`` is stored as an offset from 1 (as in the reference)."""

    beta: Tensor

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

    inv_freq: Tensor
    scale: Tensor

    def __init__(self, dim_head: int, scale_base: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim_head, 2).float() / dim_head))
        self.register_buffer("inv_freq", inv_freq)
        self.register_buffer(
            "scale", (torch.arange(0, dim_head, 2) + 0.4 * dim_head) / (1.4 * dim_head)
        )
        self.scale_base = scale_base

    def tables(self, length: int, heads: int) -> tuple[Tensor, Tensor]:
        """cos and sin (length, heads + 1, dh) of positions 0..length-1, in the buffers'
        precision, for the queries (the first ``heads``) and the key (the last) together: the
        xpos scale folded in (scale for the queries, 1/scale for the key) and sin signed so
        that ``rotate_half(x) * sin == x.roll(dh / 2) * table_sin``."""
        t = torch.arange(length, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        t = t.unsqueeze(-1)  # (S, 1)
        freqs = t * self.inv_freq  # (S, dh/2)
        scale = self.scale ** (t / self.scale_base)
        freqs, scale = torch.cat((freqs, freqs), dim=-1), torch.cat((scale, scale), dim=-1)
        cos, sin = freqs.cos(), freqs.sin()  # (S, dh)
        half = cos.shape[-1] // 2
        # rotate_half(x) = cat(-x2, x1) = x.roll(dh / 2) * [-1.., +1..]
        sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        inv = scale.reciprocal()
        s, dh = cos.shape
        return (
            torch.cat(
                ((cos * scale).unsqueeze(1).expand(s, heads, dh), (cos * inv).unsqueeze(1)), 1
            ),
            torch.cat(
                ((sin * scale).unsqueeze(1).expand(s, heads, dh), (sin * inv).unsqueeze(1)), 1
            ),
        )


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
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        positions: Tensor,
        cache: AttentionCache | None,
        layer: int,
    ) -> Tensor:
        """x (B, T, dim); cos and sin (B or 1, T, H + 1, dh) from :meth:`PaLM.rotary_tables`
        at ``positions`` (B, T). Without a cache, attention is causal over these T tokens."""
        b, n, _ = x.shape
        h, dh = self.heads, self.dim_head
        qk, v, ff = self.fused_attn_ff_proj(self.norm(x)).split(
            (h * dh + dh, dh, self.fused_dims[3]), dim=-1
        )
        qk = qk.view(b, n, h + 1, dh)  # the queries' heads, then the one key head
        if self.qk_rmsnorm:
            scales = torch.cat((self.q_scale.expand(h, dh), self.k_scale.unsqueeze(0)))
            qk = F.normalize(qk, dim=-1) * scales
        # rotary on queries and key in one go; rotate_half's sign is folded into sin
        qk = torch.addcmul(qk * cos, qk.roll(dh // 2, dims=-1), sin)
        q, k = qk[:, :, :h], qk[:, :, h:]  # (B, T, H, dh), (B, T, 1, dh)
        v = v.unsqueeze(2)
        out = attention(q, k, v) if cache is None else cache.attend(layer, q, k, v, positions)
        return self.attn_out(out) + self.ff_out(ff)


class Residual(nn.Module):
    def __init__(self, fn: ParallelTransformerBlock) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, *args: Any) -> Tensor:
        return x + self.fn(x, *args)


class PaLM(nn.Module):
    family: ClassVar[str] = "palm"  # the manifest's name for this model family
    # the block projections LoRA adapts (trainer/lora.py)
    lora_targets: ClassVar[tuple[str, ...]] = ("fused_attn_ff_proj", "attn_out", "ff_out.2")

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
        # (dtype, device, cos, sin): rotary tables, built on first use (rotary_tables)
        self._rotary: tuple[torch.dtype, torch.device, Tensor, Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.token_emb.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden(self, tokens: Tensor) -> Tensor:
        """Final normed hidden states (B, T, dim) of a causal batch over ``tokens`` (positions
        0..T-1): the trunk that reward and value heads share."""
        return self.norm(self._blocks(tokens))

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        cache: AttentionCache | None = None,
        last: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, V).

        Without a cache the batch is causal over ``tokens`` with positions 0..T-1 (right-padded
        rows are fine: padding only follows real tokens). With a cache, ``positions`` (B, T)
        say where each token sits, each below ``config.max_seq_len``; the cache holds
        everything before it. With ``last`` (B,) only the logits at those indices along T are
        returned, (B, V).
        """
        x = self._blocks(tokens, positions, cache)
        if last is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last]
        return self.to_logits(self.norm(x))

    def _blocks(
        self, tokens: Tensor, positions: Tensor | None = None, cache: AttentionCache | None = None
    ) -> Tensor:
        """The embedding and every block, before the final norm (B, T, dim)."""
        x = self.token_emb(tokens)  # (B, T, dim)
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required with a KV cache")
            n = tokens.shape[1]
            positions = torch.arange(n, device=tokens.device).expand_as(tokens)
            cos, sin = (t[:n].unsqueeze(0) for t in self.rotary_tables(x.dtype, n))
        else:
            cos, sin = (t[positions] for t in self.rotary_tables(x.dtype))
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, positions, cache, i)
        return x

    def rotary_tables(self, dtype: torch.dtype, length: int = 0) -> tuple[Tensor, Tensor]:
        """Rotary cos and sin (S, heads + 1, dh) of positions 0..S-1, S at least
        ``max(length, config.max_seq_len)``, computed from the rotary buffers then cast to
        ``dtype``; built once per dtype and device (gpt-fast's precomputed ``freqs_cis``). The
        rotary buffers are constants of ``dim_head``, so loading a state dict leaves them valid."""
        cached = self._rotary
        if cached is None or cached[:2] != (dtype, self.device) or cached[2].shape[0] < length:
            block = self.layers[0].fn
            assert isinstance(block, ParallelTransformerBlock)
            size = max(length, self.config.max_seq_len)
            # ordinary tensors even when first built under inference_mode: training reuses them
            with torch.inference_mode(False), torch.no_grad():
                cos, sin = block.rotary_emb.tables(size, block.heads)
            cached = self._rotary = (dtype, self.device, cos.to(dtype), sin.to(dtype))
        return cached[2], cached[3]

    def state_dict_for_save(self) -> dict[str, Tensor]:
        """State dict without the tied output weight (safetensors refuses shared storage)."""
        return {k: v.contiguous() for k, v in self.state_dict().items() if k != "to_logits.weight"}

    def load_saved_state(self, state: dict[str, Tensor]) -> None:
        state = dict(state)
        state.setdefault("to_logits.weight", state["token_emb.weight"])
        self.load_state_dict(state, strict=True)
