"""Runs one policy's model over a scheduled batch: ragged prefill or one-token decode, then
samples every row (gpt-fast's ``prefill`` / ``decode_one_token`` / ``sample`` split)."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch
from torch import Tensor

from server.engine.cuda_graphs import GraphDecoder
from server.engine.kv_cache import PagedKVCache
from server.engine.sampling import SampleOutput, apply_penalties, sample_rows, token_logprobs
from server.engine.sequence import Sequence
from shared.model import PaLM


class ModelRunner:
    def __init__(
        self, model: PaLM, cache: PagedKVCache, seed: int = 0, graphs: GraphDecoder | None = None
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
    ) -> SampleOutput:
        """One step. The last ``len(fork_rows)`` rows of a prefill are forks: they compute
        nothing and sample from row ``fork_rows[i]``'s logits, after ``block_copies``."""
        computed = seqs[: len(seqs) - len(fork_rows)]
        logits = self.prefill(computed) if is_prefill else self.decode(seqs)
        if block_copies:
            self.cache.copy_blocks(block_copies)
        if fork_rows:
            rows = torch.tensor(fork_rows, device=logits.device)
            logits = torch.cat((logits, logits.index_select(0, rows)))
        return self.sample(seqs, logits)

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

    def sample(self, seqs: Seq[Sequence], logits: Tensor) -> SampleOutput:
        logits = logits.float()
        raw = logits
        penalised = [i for i, s in enumerate(seqs) if s.params.has_penalties]
        if penalised:
            logits = logits.clone()
            apply_penalties(
                logits,
                penalised,
                [seqs[i].output_ids for i in penalised],
                [seqs[i].params.presence_penalty for i in penalised],
                [seqs[i].params.frequency_penalty for i in penalised],
            )
        params = [s.params for s in seqs]
        chosen = sample_rows(
            logits,
            [p.temperature for p in params],
            [p.top_p for p in params],
            [p.top_k for p in params],
            [s.generator for s in seqs],
            self.generator,
        )
        ids = chosen.tolist()
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
