"""Sampling parameters and the batched sampler.

One sampling implementation for palmchat: :func:`sample_rows` picks a token per row of a
(B, V) logits batch where every row may have its own temperature, top-k, top-p, penalties and
random generator. Rows are processed together (one softmax, one sort, one searchsorted); only
the uniform draw is per row, from that row's own ``torch.Generator``, so a seeded request gets
the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine.guided import GuidedDecoding, guided_of

MAX_TOP_LOGPROBS = 20


@dataclass(slots=True)
class SamplingParams:
    """What one request asks of generation.

    ``temperature`` 0 means greedy. ``stop`` strings end a candidate when they appear in its
    text (also across token boundaries); the stop string itself is not returned. ``seed`` makes
    sampling reproducible; candidate ``i`` of ``n`` uses ``seed + i``. ``logprobs`` returns the
    log-probability of every chosen token, plus the ``top_logprobs`` most likely alternatives.
    Penalties follow the OpenAI definition: ``logit -= frequency * count + presence * (count>0)``
    over the tokens this candidate generated so far. vLLM's extras: ``repetition_penalty``
    (as in HF and vLLM: a logit of a token already in the prompt or the output is divided by
    it when positive, multiplied when negative; 1 = off), ``logit_bias`` (token id → a bias
    in [-100, 100] added to its logit, as OpenAI), ``min_p`` (drop tokens whose probability
    is below ``min_p`` times the most likely one's), ``min_tokens`` (the end token and
    ``stop_token_ids`` cannot be picked before this many tokens) and ``stop_token_ids``
    (more token ids that end a candidate like the end token; not output). ``guided``
    constrains the text to JSON, a JSON schema, a regex or a choice
    (:mod:`server.engine.guided`).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_p: float = 0.0
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    guided: GuidedDecoding | None = None

    def __post_init__(self) -> None:
        self.guided = guided_of(self.guided)  # a dict over the Triton wire
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(self.stop_token_ids)
        if self.logit_bias is not None:  # JSON (the Triton wire) gives string keys
            bias = self.logit_bias
            if not isinstance(bias, dict) or not all(_int_like(k) for k in bias):
                raise ValueError(
                    f"SamplingParams.logit_bias must map token ids to biases: {bias!r}"
                )
            self.logit_bias = {int(k): float(v) for k, v in bias.items()} or None
        _check(self, "temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]")
        _check(self, "top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]")
        _check(self, "top_k", _is_int(self.top_k) and self.top_k >= 0, "must be an int >= 0")
        _check(
            self, "max_tokens", _is_int(self.max_tokens) and self.max_tokens >= 1, "must be >= 1"
        )
        _check(self, "n", _is_int(self.n) and 1 <= self.n <= 64, "must be an int in [1, 64]")
        _check(
            self,
            "stop",
            len(self.stop) <= 16 and all(isinstance(s, str) and s for s in self.stop),
            "must be at most 16 non-empty strings",
        )
        _check(self, "seed", self.seed is None or _is_int(self.seed), "must be an int or None")
        _check(
            self,
            "top_logprobs",
            _is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
            f"must be an int in [0, {MAX_TOP_LOGPROBS}]",
        )
        _check(
            self,
            "top_logprobs",
            self.top_logprobs == 0 or self.logprobs,
            "needs logprobs=True",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(self, name, -2.0 <= value <= 2.0, "must be in [-2, 2]")
        _check(
            self, "repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "must be in (0, 10]"
        )
        _check(self, "min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]")
        _check(
            self, "min_tokens", _is_int(self.min_tokens) and self.min_tokens >= 0, "must be >= 0"
        )
        _check(
            self,
            "min_tokens",
            self.min_tokens <= self.max_tokens,
            f"must be at most max_tokens ({self.max_tokens})",
        )
        _check(
            self,
            "stop_token_ids",
            len(self.stop_token_ids) <= 64
            and all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            "must be at most 64 token ids >= 0",
        )
        for value in (self.logit_bias or {}).values():
            if not (math.isfinite(value) and -100.0 <= value <= 100.0):
                raise ValueError(
                    f"SamplingParams.logit_bias values must be in [-100, 100], got {value!r}"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def shapes_logits(self) -> bool:
        """Anything beyond temperature/top-k/top-p that changes this row's logits."""
        return (
            self.has_penalties
            or self.repetition_penalty != 1.0
            or bool(self.logit_bias)
            or self.min_tokens > 0
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_like(value: object) -> bool:
    return _is_int(value) or (isinstance(value, str) and value.isdigit())


def _check(params: SamplingParams, name: str, ok: bool, why: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} {why}, got {getattr(params, name)!r}")
    value = getattr(params, name)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"SamplingParams.{name} must be finite, got {value!r}")


@dataclass(slots=True)
class SampleOutput:
    """Chosen ids (B,) and, for rows that asked, logprob of the choice and top alternatives."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


def apply_penalties(
    logits: Tensor,
    rows: Sequence[int],
    outputs: Sequence[Sequence[int]],
    presence: Sequence[float],
    frequency: Sequence[float],
) -> None:
    """Subtract presence/frequency penalties in place from ``logits[rows]``."""
    if not rows:
        return
    vocab = logits.shape[-1]
    counts = torch.zeros(len(rows), vocab, dtype=logits.dtype, device=logits.device)
    for i, out in enumerate(outputs):
        if out:
            ids = torch.tensor(out, device=logits.device)
            counts[i].index_add_(
                0, ids, torch.ones(len(out), dtype=logits.dtype, device=logits.device)
            )
    index = torch.tensor(rows, device=logits.device)
    freq = torch.tensor(frequency, dtype=logits.dtype, device=logits.device).unsqueeze(1)
    pres = torch.tensor(presence, dtype=logits.dtype, device=logits.device).unsqueeze(1)
    logits[index] -= counts * freq + (counts > 0).to(logits.dtype) * pres


def apply_repetition_penalty(
    logits: Tensor, rows: Sequence[int], seen: Sequence[Sequence[int]], penalties: Sequence[float]
) -> None:
    """HF/vLLM repetition penalty in place on ``logits[rows]``: for each token id in ``seen``
    (prompt and output), a positive logit is divided by the penalty, a negative multiplied."""
    for row, ids, penalty in zip(rows, seen, penalties, strict=True):
        if penalty == 1.0 or not ids:
            continue
        index = torch.tensor(sorted(set(ids)), device=logits.device)
        values = logits[row].index_select(0, index)
        logits[row].index_copy_(
            0, index, torch.where(values > 0, values / penalty, values * penalty)
        )


def apply_logit_bias(
    logits: Tensor, rows: Sequence[int], biases: Sequence[dict[int, float]]
) -> None:
    """Add each row's ``{token id: bias}`` in place (ids past the vocabulary are ignored; the
    API refuses them)."""
    vocab = logits.shape[-1]
    for row, bias in zip(rows, biases, strict=True):
        items = [(t, b) for t, b in bias.items() if 0 <= t < vocab]
        if items:
            index = torch.tensor([t for t, _ in items], device=logits.device)
            values = torch.tensor([b for _, b in items], dtype=logits.dtype, device=logits.device)
            logits[row].index_add_(0, index, values)


def ban_tokens(logits: Tensor, rows: Sequence[int], banned: Sequence[Sequence[int]]) -> None:
    """Make ``banned[i]`` unpickable in row ``rows[i]`` (``min_tokens`` not reached yet)."""
    vocab = logits.shape[-1]
    for row, ids in zip(rows, banned, strict=True):
        valid = [t for t in ids if 0 <= t < vocab]
        if valid:
            logits[row, valid] = float("-inf")


def sample_rows(
    logits: Tensor,
    temperatures: Sequence[float],
    top_ps: Sequence[float],
    top_ks: Sequence[int],
    generators: Sequence[torch.Generator | None],
    default_generator: torch.Generator | None = None,
    min_ps: Sequence[float] | None = None,
) -> Tensor:
    """Pick one token per row of (B, V) ``logits``; temperature 0 means greedy (argmax).

    Sampling is inverse-CDF over the (top-k, top-p, min-p filtered) distribution with one
    uniform draw per row; a row with its own generator draws from it, others from
    ``default_generator``.
    """
    logits = logits.float()
    batch, vocab = logits.shape
    # the first maximum of each row, as argmax gives; max's indices come from a vectorised
    # CPU kernel, faster than argmax's (docs/decisions.md, "Greedy picks with max")
    choice = logits.max(dim=-1).indices
    sampled = [i for i, t in enumerate(temperatures) if t > 0]
    if not sampled:
        return choice
    rows = torch.tensor(sampled, device=logits.device) if len(sampled) < batch else None
    sub = logits if rows is None else logits.index_select(0, rows)
    temps = torch.tensor([temperatures[i] for i in sampled], device=logits.device)
    probs = torch.softmax(sub / temps.unsqueeze(1), dim=-1)
    if min_ps is not None and any(min_ps[i] > 0 for i in sampled):
        floor = torch.tensor([min_ps[i] for i in sampled], device=logits.device).unsqueeze(1)
        probs = probs.masked_fill(probs < floor * probs.max(dim=-1, keepdim=True).values, 0.0)
    ks = [top_ks[i] if 0 < top_ks[i] < vocab else vocab for i in sampled]
    ps = [top_ps[i] for i in sampled]
    if min(ks) < vocab or min(ps) < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=logits.device).unsqueeze(0)
        drop = rank >= torch.tensor(ks, device=logits.device).unsqueeze(1)
        # drop a token once the mass before it already reaches top_p (the first always stays)
        top_p = torch.tensor(ps, device=logits.device).unsqueeze(1)
        drop |= (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    cdf = probs.cumsum(dim=-1)
    uniforms = _uniforms([generators[i] for i in sampled], default_generator)
    target = uniforms.to(logits.device).unsqueeze(1) * cdf[:, -1:]
    picked = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=vocab - 1)
    # never pick a token of zero probability (searchsorted can land on one at a flat step)
    zero = probs.gather(1, picked.unsqueeze(1)).squeeze(1) <= 0
    if bool(zero.any()):
        picked = torch.where(zero, probs.argmax(dim=-1), picked)
    if rows is None:
        return picked
    return choice.index_copy_(0, rows, picked)


def _uniforms(
    generators: Sequence[torch.Generator | None], default: torch.Generator | None
) -> Tensor:
    shared = [i for i, g in enumerate(generators) if g is None]
    out = torch.empty(len(generators))
    if shared:
        out[shared] = torch.rand(len(shared), generator=default)
    for i, g in enumerate(generators):
        if g is not None:
            out[i] = torch.rand(1, generator=g)
    return out


def token_logprobs(
    logits: Tensor, rows: Sequence[int], chosen: Tensor, top: Sequence[int]
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Log-probabilities (under the model's own distribution) of ``chosen`` for ``rows``."""
    index = torch.tensor(rows, device=logits.device)
    logp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    picked = logp.gather(1, chosen.index_select(0, index).unsqueeze(1)).squeeze(1).tolist()
    k = max(top) if top else 0
    alternatives: list[list[tuple[int, float]]] = [[] for _ in rows]
    if k:
        values, ids = logp.topk(k, dim=-1)
        values_l, ids_l = values.tolist(), ids.tolist()
        for i, want in enumerate(top):
            alternatives[i] = list(zip(ids_l[i][:want], values_l[i][:want], strict=True))
    return picked, alternatives
