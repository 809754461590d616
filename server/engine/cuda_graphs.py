"""Decode steps replayed as CUDA graphs.

A decode step of a policy this size is a few dozen small kernels; on a GPU the step's time goes
to launching them from Python, not to running them. :class:`GraphDecoder` records the whole
decode forward once per batch-size bucket (1, 2, 4, 8, ... up to ``max_num_seqs``) the first
time a step of that size comes, and from then on replays it: one launch per step.

A graph has fixed shapes and addresses, so the recorded step (:class:`StaticDecode`) differs
from the engine's eager decode in two ways. The batch is padded to its bucket with rows that
read and write only the pool's scratch block. And every row attends over all the slots its
block table can address (``max_seq_len`` keys, masked past the row's position), read straight
from the paged pool, instead of the eager path's contiguous workspace. The pool stays the one
copy of the cache, so prefix caching and preemption see every key a graph wrote.

:class:`StaticDecode` runs eagerly on any device: on CPU the tests compare it with the eager
decode, and on CUDA the graph is nothing but its recording.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from server.engine.kv_cache import PagedKVCache
from shared.families import PolicyModel


def buckets(max_rows: int) -> list[int]:
    """Batch sizes that get a graph: powers of two below ``max_rows``, then ``max_rows``."""
    sizes, b = [], 1
    while b < max_rows:
        sizes.append(b)
        b *= 2
    return [*sizes, max_rows]


class StaticDecode:
    """One decode step for exactly ``rows`` rows, with every tensor at a fixed address.

    :meth:`load` writes a step's inputs into one int64 buffer (one host-to-device copy); each
    row is ``token, position, slot, block table padded with the scratch block``. :meth:`forward`
    reads only that buffer and writes ``logits``.
    """

    def __init__(self, model: PolicyModel, cache: PagedKVCache, rows: int) -> None:
        self.model, self.cache, self.rows = model, cache, rows
        bs = cache.block_size
        self.max_blocks = -(-model.config.max_seq_len // bs)
        self.width = self.max_blocks * bs
        shape = (rows, 3 + self.max_blocks)
        self.inputs = torch.empty(shape, dtype=torch.long, device=cache.device)
        # the host side, filled row by row through numpy (cheaper than torch.tensor on nested
        # lists: docs/decisions.md, "Decode-step inputs filled through numpy"); pinned for the
        # copy where the device is a GPU
        pin = cache.device.type == "cuda"
        self._host = torch.empty(shape, dtype=torch.long, pin_memory=pin)
        self._rows = self._host.numpy()
        self._padding = np.array([0, 0, cache.scratch * bs, *[cache.scratch] * self.max_blocks])
        self.logits: Tensor | None = None
        self._mask: Tensor | None = None
        self._slots: Tensor | None = None
        self._table: Tensor | None = None
        self.load([], [], [])

    def load(
        self, tokens: Sequence[int], positions: Sequence[int], tables: Sequence[Sequence[int]]
    ) -> None:
        if len(tokens) > self.rows:
            raise ValueError(f"{len(tokens)} rows do not fit a {self.rows}-row decode step")
        if not len(tokens) == len(positions) == len(tables):
            raise ValueError("tokens, positions and tables must have one entry per row")
        bs, rows = self.cache.block_size, self._rows
        rows[:] = self._padding
        for row, tok, pos, table in zip(rows, tokens, positions, tables, strict=False):
            row[0], row[1], row[2] = tok, pos, table[pos // bs] * bs + pos % bs
            row[3 : 3 + len(table)] = table
        self.inputs.copy_(self._host)

    def forward(self) -> Tensor:
        tokens, positions = self.inputs[:, :1], self.inputs[:, 1:2]
        self._slots = self.inputs[:, 2]
        self._table = self.inputs[:, 3:].reshape(-1)
        key_pos = torch.arange(self.width, device=self.inputs.device).unsqueeze(0)
        hidden = key_pos > positions  # (rows, width): slots past each row's position
        mask = torch.zeros(hidden.shape, dtype=self.cache.k.dtype, device=hidden.device)
        self._mask = mask.masked_fill_(hidden, float("-inf")).unsqueeze(1)
        self.logits = self.model(tokens, positions, self)[:, 0]
        return self.logits

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """The model's ``AttentionCache``: store this step's key/value in the pool, attend over
        each row's blocks. q (B, 1, H, dh), k and v (B, 1, Hkv, dh) -> (B, 1, H * dh)."""
        assert self._slots is not None and self._table is not None and self._mask is not None
        cache = self.cache
        b, width = q.shape[0], cache.width
        cache.store(layer, k.reshape(-1, width), v.reshape(-1, width), self._slots)
        keys = cache.k[layer].index_select(0, self._table).view(b, self.width, width)
        values = cache.v[layer].index_select(0, self._table).view(b, self.width, width)
        return cache.decode_attention(q, keys, values, self._mask)


class GraphDecoder:
    """Fixed-shape decode steps by bucket; recorded as CUDA graphs when ``record`` is true
    (the default on CUDA), otherwise run eagerly (CPU tests of the same path)."""

    def __init__(
        self, model: PolicyModel, cache: PagedKVCache, max_rows: int, record: bool | None = None
    ) -> None:
        self.model, self.cache = model, cache
        self.buckets = buckets(max_rows)
        self.record = cache.device.type == "cuda" if record is None else record
        self._steps: dict[int, tuple[StaticDecode, torch.cuda.CUDAGraph | None]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.record else None
        self.replays = 0

    def bucket(self, rows: int) -> int | None:
        return next((b for b in self.buckets if b >= rows), None)

    @torch.inference_mode()
    def run(
        self, tokens: Sequence[int], positions: Sequence[int], tables: Sequence[Sequence[int]]
    ) -> Tensor | None:
        """Logits (B, V) of one decode step, or None when the batch is larger than every
        bucket. The tensor is the step's own buffer: read it before the next step."""
        rows = self.bucket(len(tokens))
        if rows is None:
            return None
        static, graph = self._steps.get(rows) or self._prepare(rows)
        static.load(tokens, positions, tables)
        if graph is None:
            logits = static.forward()
        else:
            graph.replay()
            logits = static.logits  # type: ignore[assignment]
        self.replays += 1
        return logits[: len(tokens)]

    def _prepare(self, rows: int) -> tuple[StaticDecode, torch.cuda.CUDAGraph | None]:
        static = StaticDecode(self.model, self.cache, rows)
        graph = None
        if self.record:
            device = self.cache.device
            # warm-up off the default stream, as graph capture wants: library handles, the
            # model's rotary tables and the allocator's blocks all exist before recording.
            # The padding rows it runs write only the scratch block.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    static.forward()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                static.forward()
        self._steps[rows] = (static, graph)
        return static, graph

    @torch.inference_mode()
    def replay_seconds(self, rows: int, repeats: int = 200) -> float:
        """GPU time of one recorded step of ``rows`` rows, replayed back to back on padding
        rows (which touch only the scratch block): the step without any host work."""
        static, graph = self._steps[rows]
        if graph is None:
            raise ValueError(f"no CUDA graph recorded for {rows} rows")
        static.load([], [], [])
        graph.replay()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats

    @property
    def recorded(self) -> list[int]:
        """Bucket sizes recorded so far."""
        return sorted(r for r, (_, g) in self._steps.items() if g is not None)
