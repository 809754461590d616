"""Paged KV-cache bookkeeping: a fixed pool of blocks, per-sequence block tables, prefix cache.

A block holds ``block_size`` consecutive token positions of one sequence. Every *full* block is
keyed by a hash chained over all tokens up to its end, so two sequences whose prompts start the
same (a shared system prompt, the n candidates of one request) point at the same physical
blocks and those tokens are prefilled once. A freed block keeps its hash until the pool hands
it out again, so a later request can still hit it. The block that holds a sequence's last token
is never shared, so shared blocks are read-only: the n candidates of one request fork from one
prefill, sharing its full blocks and each getting a copy of its partial last block.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from server.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()
    # False while the sequence that fills it has not run its prefill yet
    ready: bool = False


@dataclass(slots=True)
class PrefixStats:
    queries: int = 0  # full prompt blocks looked up
    hits: int = 0  # of those, found already computed
    hit_tokens: int = 0


@dataclass
class BlockManager:
    num_blocks: int
    block_size: int
    blocks: list[Block] = field(init=False)
    # free blocks, least recently freed first (the pool reuses those, keeping recent prefixes);
    # an ordered dict so a cache hit takes its block out of the middle in O(1)
    free_ids: OrderedDict[int, None] = field(init=False)
    by_hash: dict[int, int] = field(init=False)
    stats: PrefixStats = field(init=False)

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError("BlockManager needs num_blocks >= 1 and block_size >= 1")
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self.free_ids = OrderedDict.fromkeys(range(self.num_blocks))
        self.by_hash = {}
        self.stats = PrefixStats()

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_ids)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @staticmethod
    def chain_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
        return hash((prev, tokens))

    def _full_block_hashes(self, token_ids: list[int]) -> list[tuple[int, tuple[int, ...]]]:
        """(hash, tokens) of each full block that does not hold the last token."""
        out: list[tuple[int, tuple[int, ...]]] = []
        prev: int | None = None
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            prev = self.chain_hash(prev, tokens)
            out.append((prev, tokens))
        return out

    def _cached(self, h: int, tokens: tuple[int, ...]) -> Block | None:
        block_id = self.by_hash.get(h)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        return block if block.token_ids == tokens else None

    def waits_for_prefix(self, seq: Sequence) -> bool:
        """True if the sequence would share a block another sequence is still prefilling."""
        for h, tokens in self._full_block_hashes(seq.token_ids):
            block = self._cached(h, tokens)
            if block is None:
                return False
            if not block.ready:
                return True
        return False

    def can_allocate(self, seq: Sequence) -> bool:
        needed = self.blocks_needed(seq.num_tokens)
        shared = 0  # cached blocks in use by others cost nothing; cached free ones do
        for h, tokens in self._full_block_hashes(seq.token_ids):
            block = self._cached(h, tokens)
            if block is None or not block.ready:
                break
            shared += block.ref_count > 0
        return self.num_free >= needed - shared

    def allocate(self, seq: Sequence) -> None:
        """Give ``seq`` a block table for all its tokens, reusing cached prefix blocks."""
        assert not seq.block_table, "sequence already has blocks"
        hashes = self._full_block_hashes(seq.token_ids)
        cached_tokens = 0
        missed = False
        for i in range(self.blocks_needed(seq.num_tokens)):
            block = None
            if i < len(hashes):
                h, tokens = hashes[i]
                self.stats.queries += 1
                if not missed:
                    block = self._cached(h, tokens)
            if block is not None and block.ready:
                self.stats.hits += 1
                cached_tokens += self.block_size
                if block.ref_count == 0:
                    del self.free_ids[block.block_id]
                block.ref_count += 1
            else:
                missed = True
                block = self._take()
                if i < len(hashes):
                    self._register(block, *hashes[i])
            seq.block_table.append(block.block_id)
        self.stats.hit_tokens += cached_tokens
        seq.num_cached_tokens = cached_tokens

    def can_fork(self, seq: Sequence) -> bool:
        """Room to fork ``seq``: a block for the copy of its partial last block, if it has one."""
        return self.num_free >= (1 if seq.num_tokens % self.block_size else 0)

    def fork(self, source: Sequence, seq: Sequence) -> tuple[int, int] | None:
        """Give ``seq`` (the same tokens as ``source``, which is about to compute them) a block
        table: ``source``'s full blocks, shared, and for the partial last block that both will
        write into, a block of its own. Returns that block as (source block, new block), whose
        contents the caller copies once ``source``'s prefill has written them."""
        assert not seq.block_table, "sequence already has blocks"
        assert seq.token_ids == source.token_ids, "a fork has its source's tokens"
        full = seq.num_tokens // self.block_size
        for block_id in source.block_table[:full]:
            self.blocks[block_id].ref_count += 1
            seq.block_table.append(block_id)
        self.stats.queries += full
        self.stats.hits += full
        self.stats.hit_tokens += full * self.block_size
        seq.num_cached_tokens = seq.num_tokens  # computed once, by ``source``
        if len(source.block_table) == full:
            return None
        block = self._take()
        seq.block_table.append(block.block_id)
        return source.block_table[full], block.block_id

    def _take(self) -> Block:
        block = self.blocks[self.free_ids.popitem(last=False)[0]]
        if block.hash is not None and self.by_hash.get(block.hash) == block.block_id:
            del self.by_hash[block.hash]
        block.hash, block.token_ids, block.ready, block.ref_count = None, (), False, 1
        return block

    def _register(self, block: Block, h: int, tokens: tuple[int, ...]) -> None:
        block.hash, block.token_ids = h, tokens
        self.by_hash[h] = block.block_id

    def mark_ready(self, seq: Sequence) -> None:
        """The sequence's prefill ran: its blocks now hold computed keys and values."""
        for block_id in seq.block_table:
            self.blocks[block_id].ready = True

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if not block.ready and block.hash is not None:
                    # never computed (the sequence left before its prefill): forget the hash
                    if self.by_hash.get(block.hash) == block_id:
                        del self.by_hash[block.hash]
                    block.hash, block.token_ids = None, ()
                self.free_ids[block_id] = None
        seq.block_table.clear()
        seq.num_cached_tokens = 0

    def can_append(self, seq: Sequence) -> bool:
        """Room for the token at position ``num_tokens - 1`` (a new block if it starts one)."""
        return self.num_free >= (1 if self._needs_block(seq) else 0)

    def _needs_block(self, seq: Sequence) -> bool:
        return len(seq.block_table) < self.blocks_needed(seq.num_tokens)

    def append_slot(self, seq: Sequence) -> None:
        """Before a decode step: make sure the last token has a slot; hash a just-filled block."""
        if self._needs_block(seq):
            seq.block_table.append(self._take().block_id)
        bs = self.block_size
        n = seq.num_tokens - 1  # tokens already in the cache before this step
        if n % bs == 0 and n > 0:
            # block n//bs - 1 just became full with generated tokens: make it shareable
            i = n // bs - 1
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                prev = self.blocks[seq.block_table[i - 1]].hash if i > 0 else None
                if i == 0 or prev is not None:
                    tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                    h = self.chain_hash(prev, tokens)
                    if h not in self.by_hash:
                        self._register(block, h, tokens)
                    block.ready = True
