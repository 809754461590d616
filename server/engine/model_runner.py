"""Runs one policy's model over a scheduled batch: ragged prefill or one-token decode, then
samples every row (gpt-fast's ``prefill`` / ``decode_one_token`` / ``sample`` split)."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq

import torch
from torch import Tensor

from server.engine.cuda_graphs import GraphDecoder
from server.engine.guided import apply_guides
from server.engine.kv_cache import PagedKVCache
from server.engine.sampling import (
    SampleOutput,
    apply_logit_bias,
    apply_penalties,
    apply_repetition_penalty,
    ban_tokens,
    sample_rows,
    token_logprobs,
)
from server.engine.sequence import Sequence
from shared.families import PolicyModel


class ModelRunner:
    def __init__(
        self,
        model: PolicyModel,
        cache: PagedKVCache,
        seed: int = 0,
        graphs: GraphDecoder | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.device = cache.device
        self.graphs = graphs  # fixed-shape decode steps (CUDA graphs); None: eager decode
        # draws for requests without a seed
        self.generator = torch.Generator().manual_seed(seed)

    @torch.inference_mode()
    def run(
        self,
        seqs: Seq[Sequence],
        is_prefill: bool,
        fork_rows: Seq[int] = (),
        block_copies: Seq[tuple[int, int]] = (),
        end_ids: Seq[int] = (),
    ) -> SampleOutput:
        """One step. The last ``len(fork_rows)`` rows of a prefill are forks: they compute
        nothing and sample from row ``fork_rows[i]``'s logits, after ``block_copies``.
        ``end_ids`` are the policy's stop tokens (``min_tokens`` holds them back)."""
        computed = seqs[: len(seqs) - len(fork_rows)]
        logits = self.prefill(computed) if is_prefill else self.decode(seqs)
        if block_copies:
            self.cache.copy_blocks(block_copies)
        if fork_rows:
            rows = torch.tensor(fork_rows, device=logits.device)
            logits = torch.cat((logits, logits.index_select(0, rows)))
        return self.sample(seqs, logits, end_ids)

    def prefill(self, seqs: Seq[Sequence]) -> Tensor:
        """Every row computes its tokens after the cached prefix; logits at each row's last."""
        starts = [s.num_cached_tokens for s in seqs]
        lengths = [s.num_tokens - c for s, c in zip(seqs, starts, strict=True)]
        width = max(lengths)
        tokens = torch.zeros(len(seqs), width, dtype=torch.long)
        positions = torch.empty(len(seqs), width, dtype=torch.long)
        for i, (s, c, n) in enumerate(zip(seqs, starts, lengths, strict=True)):
            tokens[i, :n] = torch.tensor(s.token_ids[c:], dtype=torch.long)
            positions[i] = torch.arange(c, c + width).clamp_(max=c + n - 1)
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        lengths_t = torch.tensor(lengths, device=self.device)
        valid = torch.arange(width, device=self.device).unsqueeze(0) < lengths_t.unsqueeze(1)
        self.cache.prepare([s.block_table for s in seqs], positions, valid)
        return self.model(tokens, positions, self.cache, last=lengths_t - 1)

    def decode(self, seqs: Seq[Sequence]) -> Tensor:
        """One new token per row: the last sampled token at position ``num_tokens - 1``."""
        if self.graphs is not None:
            logits = self.graphs.run(
                [s.token_ids[-1] for s in seqs],
                [s.num_tokens - 1 for s in seqs],
                [s.block_table for s in seqs],
            )
            if logits is not None:
                # the eager path's workspace did not see this step's keys: it must regather
                self.cache.workspace.reset()
                return logits
        tokens = torch.tensor([[s.token_ids[-1]] for s in seqs], device=self.device)
        where = [s.num_tokens - 1 for s in seqs]
        self.cache.prepare_decode([s.block_table for s in seqs], where, [s.uid for s in seqs])
        positions = torch.tensor(where, device=self.device).unsqueeze(1)
        return self.model(tokens, positions, self.cache)[:, 0]

    def sample(self, seqs: Seq[Sequence], logits: Tensor, end_ids: Seq[int] = ()) -> SampleOutput:
        logits = logits.float()
        raw = logits
        shaped = [i for i, s in enumerate(seqs) if s.params.shapes_logits]
        guided = [i for i, s in enumerate(seqs) if s.guide is not None]
        if shaped or guided:
            logits = logits.clone()
        if shaped:
            self._shape(logits, [seqs[i] for i in shaped], shaped, end_ids)
        if guided:  # last: no penalty or bias may bring back a token the grammar forbids
            apply_guides(logits, guided, [g for i in guided if (g := seqs[i].guide)])
        params = [s.params for s in seqs]
        chosen = sample_rows(
            logits,
            [p.temperature for p in params],
            [p.top_p for p in params],
            [p.top_k for p in params],
            [s.generator for s in seqs],
            self.generator,
            [p.min_p for p in params],
        )
        ids = chosen.tolist()
        for i in guided:
            guide = seqs[i].guide
            if guide is not None:
                guide.accept(ids[i])
        logprobs: list[float | None] = [None] * len(seqs)
        tops: list[list[tuple[int, float]] | None] = [None] * len(seqs)
        rows = [i for i, p in enumerate(params) if p.logprobs]
        if rows:
            picked, alternatives = token_logprobs(
                raw, rows, chosen, [params[i].top_logprobs for i in rows]
            )
            for j, i in enumerate(rows):
                logprobs[i], tops[i] = picked[j], alternatives[j]
        return SampleOutput(ids, logprobs, tops)

    def _shape(
        self, logits: Tensor, seqs: list[Sequence], rows: list[int], end_ids: Seq[int]
    ) -> None:
        """Penalties, logit bias and the min_tokens ban, in place, for ``rows``; logprobs
        stay those of the model's own distribution."""

        def where(wants: Callable[[Sequence], bool]) -> tuple[list[int], list[Sequence]]:
            chosen = [(r, s) for r, s in zip(rows, seqs, strict=True) if wants(s)]
            return [r for r, _ in chosen], [s for _, s in chosen]

        ends = tuple(end_ids)
        at, of = where(lambda s: s.params.has_penalties)
        if at:
            presence = [s.params.presence_penalty for s in of]
            frequency = [s.params.frequency_penalty for s in of]
            apply_penalties(logits, at, [s.output_ids for s in of], presence, frequency)
        at, of = where(lambda s: s.params.repetition_penalty != 1)
        if at:
            penalty = [s.params.repetition_penalty for s in of]
            apply_repetition_penalty(logits, at, [s.token_ids for s in of], penalty)
        at, of = where(lambda s: bool(s.params.logit_bias))
        if at:
            apply_logit_bias(logits, at, [s.params.logit_bias or {} for s in of])
        at, of = where(lambda s: len(s.output_ids) < s.params.min_tokens)
        if at:
            ban_tokens(logits, at, [(*ends, *s.params.stop_token_ids) for s in of])
