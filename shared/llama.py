"""The Llama family: Llama, Mistral and Qwen2 checkpoints in Hugging Face's layout.

RMSNorm, rotary embeddings (``rope_theta``, with linear or Llama 3 frequency scaling),
grouped-query attention, a SwiGLU MLP, tied or untied embeddings, Qwen2's q/k/v biases.
Parameter names are transformers' (``model.layers.0.self_attn.q_proj.weight``, ...), so an HF
``model.safetensors`` loads as it is and a published version is itself an HF-format state dict.

The forward contract is PaLM's (``shared/model.py``), so the engine, the trainer and Triton
never ask which family they run::

    model = Llama(LlamaConfig(num_tokens=512, dim=64, depth=2, heads=4, kv_heads=2,
                              dim_head=16, ff_inner_dim=128))
    logits = model(tokens)                              # training: causal, (B, T, V)
    cache = KVCache.allocate(model.config, batch=2, max_len=64)
    logits = model(tokens, positions, cache)            # prefill (B, T)
    logits = model(next_tokens, next_positions, cache)  # decode (B, 1)

Mistral's sliding window is not computed: an import caps ``max_seq_len`` at the window, where
full causal attention is the same thing (``shared/hf_import.py``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.model import AttentionCache, attention, require_positive, strict_from_dict

# rope_scaling kinds computed here (transformers' rope_type names)
ROPE_KINDS = ("default", "linear", "llama3")


@dataclass(slots=True)
class LlamaConfig:
    num_tokens: int
    dim: int
    depth: int
    heads: int
    kv_heads: int
    dim_head: int
    ff_inner_dim: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # transformers' rope_scaling without rope_theta: {"rope_type": "linear", "factor": 2.0}, ...
    rope_scaling: dict[str, Any] | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2; Llama's attention_bias sets it and out_bias
    out_bias: bool = False
    mlp_bias: bool = False
    max_seq_len: int = 4096

    def __post_init__(self) -> None:
        names = ("num_tokens", "dim", "depth", "heads", "kv_heads", "dim_head", "ff_inner_dim")
        require_positive(self, (*names, "max_seq_len"), "LlamaConfig.")
        if self.heads % self.kv_heads:
            raise ValueError(
                f"LlamaConfig.heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})"
            )
        if self.dim_head % 2:
            raise ValueError(f"LlamaConfig.dim_head must be even for rotary, got {self.dim_head}")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError("LlamaConfig.norm_eps and rope_theta must be positive")
        kind = rope_kind(self.rope_scaling)
        if kind not in ROPE_KINDS:
            raise ValueError(
                f"unsupported rope_scaling {kind!r}; supported: {', '.join(ROPE_KINDS)}"
            )
        if kind != "default":
            needs = ("factor",) if kind == "linear" else LLAMA3_KEYS
            assert self.rope_scaling is not None
            missing = [k for k in needs if not isinstance(self.rope_scaling.get(k), int | float)]
            if missing:
                raise ValueError(f"rope_scaling {kind!r} needs numbers for {', '.join(missing)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlamaConfig:
        return strict_from_dict(cls, data)


LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_kind(scaling: dict[str, Any] | None) -> str:
    """transformers' name for a rope_scaling dict (its older files say ``type``)."""
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def inverse_frequencies(config: LlamaConfig, device: torch.device | None = None) -> Tensor:
    """Rotary inverse frequencies (dh / 2,) in float32, after the config's rope scaling.

    Llama 3's rule (https://github.com/meta-llama/llama-models, ``apply_scaling``): wavelengths
    longer than the original context / low_freq_factor are stretched by ``factor``, those
    shorter than the original context / high_freq_factor kept, and the band between blended.
    """
    dh = config.dim_head
    steps = torch.arange(0, dh, 2, dtype=torch.int64, device=device).float()
    inv = 1.0 / (config.rope_theta ** (steps / dh))
    kind, s = rope_kind(config.rope_scaling), config.rope_scaling or {}
    if kind == "linear":
        return inv / s["factor"]
    if kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        context = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        stretched = torch.where(wavelen > context / low, inv / factor, inv)
        blend = (context / wavelen - low) / (high - low)
        smoothed = (1 - blend) * stretched / factor + blend * stretched
        between = (wavelen >= context / high) & (wavelen <= context / low)
        return torch.where(between, smoothed, stretched)
    return inv


class RMSNorm(nn.Module):
    """https://arxiv.org/abs/1910.07467; normalised in float32, scaled in the input's dtype
    (as transformers does, so bfloat16 logits match too)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary on x (B, T, heads, dh); cos and sin (B or 1, T, 1, dh) with rotate_half's sign
    folded into sin (see :meth:`Llama.rotary_tables`)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.dim_head = c.heads, c.kv_heads, c.dim_head
        self.q_proj = nn.Linear(c.dim, c.heads * c.dim_head, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.dim, c.kv_heads * c.dim_head, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.dim, c.kv_heads * c.dim_head, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.heads * c.dim_head, c.dim, bias=c.out_bias)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        positions: Tensor,
        cache: AttentionCache | None,
        layer: int,
    ) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.dim_head)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.dim_head)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.dim_head)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = attention(q, k, v) if cache is None else cache.attend(layer, q, k, v, positions)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU, https://arxiv.org/abs/2002.05202"""

    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.ff_inner_dim, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.dim, c.ff_inner_dim, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.ff_inner_dim, c.dim, bias=c.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention, then pre-norm MLP, each added to the residual stream."""

    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = MLP(c)

    def forward(self, x: Tensor, *args: Any) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), *args)
        return x + self.mlp(self.post_attention_layernorm(x))


class Trunk(nn.Module):
    """transformers' ``LlamaModel``: embedding, blocks, final norm (named as there)."""

    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.num_tokens, c.dim)
        self.layers = nn.ModuleList([DecoderLayer(c) for _ in range(c.depth)])
        self.norm = RMSNorm(c.dim, c.norm_eps)


class Llama(nn.Module):
    family: ClassVar[str] = "llama"  # the manifest's name for this model family
    lora_targets: ClassVar[tuple[str, ...]] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )  # fmt: skip

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Trunk(config)
        self.lm_head = nn.Linear(config.dim, config.num_tokens, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # (dtype, device, cos, sin): rotary tables, built on first use (rotary_tables)
        self._rotary: tuple[torch.dtype, torch.device, Tensor, Tensor] | None = None

    # the names the engine and the trainer use for every family
    @property
    def token_emb(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def to_logits(self) -> nn.Linear:
        return self.lm_head

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden(self, tokens: Tensor) -> Tensor:
        """Final normed hidden states (B, T, dim) of a causal batch over ``tokens`` (positions
        0..T-1): the trunk that reward and value heads share."""
        return self.model.norm(self._blocks(tokens))

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        cache: AttentionCache | None = None,
        last: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, V), or (B, V) at the indices ``last`` (B,) along T: the contract of
        :meth:`shared.model.PaLM.forward`."""
        x = self._blocks(tokens, positions, cache)
        if last is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last]
        return self.lm_head(self.model.norm(x))

    def _blocks(
        self, tokens: Tensor, positions: Tensor | None = None, cache: AttentionCache | None = None
    ) -> Tensor:
        """The embedding and every block, before the final norm (B, T, dim)."""
        x = self.model.embed_tokens(tokens)  # (B, T, dim)
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required with a KV cache")
            n = tokens.shape[1]
            positions = torch.arange(n, device=tokens.device).expand_as(tokens)
            cos, sin = (t[:n].view(1, n, 1, -1) for t in self.rotary_tables(x.dtype, n))
        else:
            cos, sin = (t[positions].unsqueeze(2) for t in self.rotary_tables(x.dtype))
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, positions, cache, i)
        return x

    def rotary_tables(self, dtype: torch.dtype, length: int = 0) -> tuple[Tensor, Tensor]:
        """Rotary cos and sin (S, dh) of positions 0..S-1, S at least ``max(length,
        config.max_seq_len)``: computed in float32 from the config, then cast to ``dtype``;
        sin signed so that ``rotate_half(x) * sin == x.roll(dh / 2) * table_sin``. Built once
        per dtype and device."""
        cached = self._rotary
        if cached is None or cached[:2] != (dtype, self.device) or cached[2].shape[0] < length:
            size = max(length, self.config.max_seq_len)
            with torch.inference_mode(False), torch.no_grad():
                inv = inverse_frequencies(self.config, self.device)
                t = torch.arange(size, device=self.device, dtype=torch.float32)
                freqs = torch.outer(t, inv)  # (S, dh/2)
                cos, sin = freqs.cos(), freqs.sin()
                cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
            cached = self._rotary = (dtype, self.device, cos.to(dtype), sin.to(dtype))
        return cached[2], cached[3]

    def state_dict_for_save(self) -> dict[str, Tensor]:
        """State dict without a tied output weight (safetensors refuses shared storage)."""
        tied = self.config.tie_embeddings
        return {
            k: v.contiguous()
            for k, v in self.state_dict().items()
            if not (tied and k == "lm_head.weight")
        }

    def load_saved_state(self, state: dict[str, Tensor]) -> None:
        state = dict(state)
        if self.config.tie_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        self.load_state_dict(state, strict=True)
