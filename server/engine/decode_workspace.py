"""Contiguous keys/values of the running decode batch, so a decode step need not re-gather
every row's paged blocks in every layer.

Row ``i`` holds sequence ``i`` of the batch: positions ``0..p-1`` copied from its blocks (all
layers in one gather when the batch changes), then each step's new key/value written at
``p`` - into the paged pool (the source of truth, which prefix caching and preemption use) and
here. While the batch stays the same sequences in the same order, each one token longer per
step, nothing is gathered again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class DecodeWorkspace:
    def __init__(self, k_pool: Tensor, v_pool: Tensor, max_len: int, headroom: int = 128) -> None:
        self.k_pool, self.v_pool = k_pool, v_pool  # (L, blocks + 1, block_size, Hkv * dh)
        self.max_len, self.headroom = max_len, headroom
        self.k: Tensor | None = None  # (L, B, capacity, Hkv * dh)
        self.v: Tensor | None = None
        self._uids: list[int] = []
        self._next: list[int] = []  # the position each row writes next
        self.index: Tensor | None = None  # (B,) flat row * capacity + position of this step
        self.width = 0  # keys to attend over this step

    def prepare(
        self, uids: list[int], tables: Sequence[Sequence[int]], positions: list[int], scratch: int
    ) -> None:
        """Ready the workspace for one decode step of ``uids`` writing at ``positions``."""
        capacity = 0 if self.k is None else self.k.shape[2]
        if uids != self._uids or positions != self._next or max(positions) >= capacity:
            self._rebuild(tables, positions, scratch)
            capacity = self.k.shape[2]  # type: ignore[union-attr]
        self._uids, self._next = uids, [p + 1 for p in positions]
        rows = torch.arange(len(uids), device=self.k_pool.device) * capacity
        self.index = rows + torch.tensor(positions, device=self.k_pool.device)
        self.width = max(positions) + 1

    def _rebuild(self, tables: Sequence[Sequence[int]], positions: list[int], scratch: int) -> None:
        layers, _, bs, dh = self.k_pool.shape
        width = max(len(t) for t in tables)
        wanted = min(max(positions) + self.headroom, self.max_len)
        capacity = max(-(-wanted // bs) * bs, width * bs)
        table = torch.tensor(
            [[*t, *[scratch] * (width - len(t))] for t in tables],
            dtype=torch.long,
            device=self.k_pool.device,
        ).view(-1)
        rows = len(tables)
        shape = (layers, rows, capacity, dh)
        # zeros, not uninitialised memory: slots past a row's position are masked out of the
        # softmax, but a NaN or inf left there by an earlier allocation would still poison the
        # row (NaN * 0 in the value product, NaN + -inf in the scores)
        self.k = self.k_pool.new_zeros(shape)
        self.v = self.v_pool.new_zeros(shape)
        # all layers at once; slots past a row's position hold stale keys that the mask hides
        self.k[:, :, : width * bs] = self.k_pool.index_select(1, table).view(layers, rows, -1, dh)
        self.v[:, :, : width * bs] = self.v_pool.index_select(1, table).view(layers, rows, -1, dh)

    def write_and_read(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's k, v (B, Hkv * dh) of ``layer``; return keys, values
        (B, width, Hkv * dh)."""
        assert self.k is not None and self.v is not None and self.index is not None
        dh = k.shape[-1]
        k_layer, v_layer = self.k[layer], self.v[layer]
        k_layer.view(-1, dh).index_copy_(0, self.index, k)
        v_layer.view(-1, dh).index_copy_(0, self.index, v)
        return k_layer[:, : self.width], v_layer[:, : self.width]

    def reset(self) -> None:
        self.k = self.v = self.index = None
        self._uids, self._next = [], []
