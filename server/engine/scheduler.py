"""Continuous batching for one policy: admit waiting sequences, decode running ones, preempt.

Each :meth:`Scheduler.schedule` call returns one batch: a prefill of newly admitted sequences
(bounded by ``max_num_seqs`` and the padded token budget), or else one decode token for every
running sequence. When a decode needs a block and none is free, the newest running sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
(prompt + what it generated so far) when blocks free up.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

from server.engine.block_manager import BlockManager
from server.engine.config import EngineConfig
from server.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    """One step's rows. A prefill may end with *forked* rows: candidates of a request whose
    prompt another row of this batch computes. They compute nothing; ``fork_rows[i]`` is the
    row whose logits the ``i``-th of them samples its first token from, and ``block_copies``
    are (source, destination) blocks to copy once the prefill has written the sources."""

    seqs: list[Sequence]
    is_prefill: bool
    fork_rows: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Tokens this step computes: each row's uncached part in a prefill, one per row in a
        decode."""
        if not self.is_prefill:
            return len(self.seqs)
        return sum(s.num_tokens - s.num_cached_tokens for s in self.seqs)


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, max_seq_len: int) -> None:
        self.config = config
        self.blocks = blocks
        self.max_seq_len = max_seq_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        """Queue an admitted sequence (:meth:`LLMEngine.check_admission` refused the rest)."""
        self.waiting.append(seq)

    def schedule(self, now: float) -> ScheduledBatch | None:
        prefill = self._admit(now)
        if prefill is not None:
            return prefill
        decode: list[Sequence] = []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            while not self.blocks.can_append(seq):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append_slot(seq)
                decode.append(seq)
        return ScheduledBatch(decode, is_prefill=False) if decode else None

    def _admit(self, now: float) -> ScheduledBatch | None:
        batch: list[Sequence] = []
        forks: list[tuple[int, Sequence]] = []
        copies: list[tuple[int, int]] = []
        width = 0
        deferred: list[Sequence] = []
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if self.blocks.waits_for_prefix(seq):
                # shares a prefix that a sequence in this batch is computing: next step
                deferred.append(self.waiting.popleft())
                continue
            # budget check before allocation assumes nothing is cached (conservative)
            new_width = max(width, seq.num_tokens)
            if batch and (len(batch) + 1) * new_width > self.config.max_batched_tokens:
                break
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            width = max(width, seq.num_tokens - seq.num_cached_tokens)
            self._start(seq, now)
            batch.append(seq)
            for sibling in self._siblings(seq):
                if len(self.running) >= self.config.max_num_seqs:
                    break
                if not self.blocks.can_fork(seq):
                    break
                self.waiting.remove(sibling)
                copy = self.blocks.fork(seq, sibling)
                if copy is not None:
                    copies.append(copy)
                self._start(sibling, now)
                forks.append((len(batch) - 1, sibling))
        self.waiting.extendleft(reversed(deferred))
        if not batch:
            return None
        return ScheduledBatch(
            batch + [s for _, s in forks], True, [row for row, _ in forks], copies
        )

    def _siblings(self, seq: Sequence) -> list[Sequence]:
        """The other candidates of ``seq``'s request still waiting to start: the same prompt,
        so they fork from its prefill instead of computing (or waiting for) it themselves."""
        if seq.params.n == 1 or seq.output_ids or seq.num_preemptions:
            return []
        return [
            s
            for s in self.waiting
            if s.request_id == seq.request_id and not s.output_ids and not s.num_preemptions
        ]

    def _start(self, seq: Sequence, now: float) -> None:
        if seq.first_scheduled is None:
            seq.first_scheduled = now
            seq.first_cached_tokens = seq.num_cached_tokens
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def postprocess(
        self, batch: ScheduledBatch, token_ids: list[int], now: float, end_ids: Collection[int]
    ) -> list[tuple[Sequence, bool]]:
        """Append each sampled token; return (sequence, token_is_output) pairs. One of the
        policy's ``end_ids`` (its tokenizer's stop tokens) or of the request's
        ``stop_token_ids`` finishes its sequence (and is not output), as do max_tokens, the
        model's context and the KV pool's size."""
        out = []
        for seq, token in zip(batch.seqs, token_ids, strict=True):
            if batch.is_prefill:
                self.blocks.mark_ready(seq)
            ends = token in end_ids and not seq.params.ignore_eos
            if ends or token in seq.params.stop_token_ids:
                seq.finish_reason = FinishReason.STOP
                if seq.first_token is None:
                    seq.first_token = now
                out.append((seq, False))
                continue
            seq.append(token, now)
            if (
                len(seq.output_ids) >= seq.params.max_tokens
                or seq.num_tokens >= self.max_seq_len
                # its next step would need more blocks than the whole pool has: it could only
                # be preempted and re-admitted forever, so it ends here, as at the context limit
                or self.blocks.blocks_needed(seq.num_tokens) > self.blocks.num_blocks
            ):
                seq.finish_reason = FinishReason.LENGTH
            out.append((seq, True))
        return out

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Remove a sequence (done or cancelled) and free its blocks now."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.finish_reason = reason
        seq.status = SequenceStatus.FINISHED
