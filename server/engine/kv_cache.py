"""The paged KV cache tensors and the attention that reads them.

Layer ``l`` keeps keys and values in ``(num_blocks + 1, block_size, kv_heads * dim_head)`` pools:
a slot holds every key/value head of one token side by side (PaLM's multi-query attention has
one, a grouped-query Llama-family model several). The extra last block is scratch: padding
tokens of a ragged prefill write there and no block table points at it. Before each forward
the runner calls :meth:`PagedKVCache.prepare` with the batch's block tables and positions;
every layer then writes its new keys/values into their slots and attends over the sequence's
blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from server.engine.decode_workspace import DecodeWorkspace
from shared.model import CacheShape, attention


def blocks_for_budget(config: CacheShape, block_size: int, memory_mb: float, dtype: torch.dtype):
    """How many blocks of ``block_size`` tokens fit ``memory_mb`` of keys + values."""
    per_block = 2 * config.depth * block_size * config.kv_heads * config.dim_head * dtype.itemsize
    return int(memory_mb * 2**20 // per_block)


class PagedKVCache:
    def __init__(
        self,
        config: CacheShape,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch = num_blocks
        self.kv_heads, self.dim_head = config.kv_heads, config.dim_head
        self.width = config.kv_heads * config.dim_head  # one slot: every head's key (or value)
        shape = (config.depth, num_blocks + 1, block_size, self.width)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.device = device
        self.scale = config.dim_head**-0.5
        self._slots: Tensor | None = None
        self._tables: Tensor | None = None
        self._mask: Tensor | None = None
        self._rows = 0
        self.workspace = DecodeWorkspace(self.k, self.v, config.max_seq_len)

    def prepare(
        self, tables: Sequence[Sequence[int]], positions: Tensor, valid: Tensor | None = None
    ) -> None:
        """Set up one forward: block table per row, positions (B, T) of the tokens, and which of
        them are real (False for right padding, which writes to scratch)."""
        bs = self.block_size
        width = max(len(t) for t in tables)
        table = torch.tensor(
            [[*t, *[self.scratch] * (width - len(t))] for t in tables], dtype=torch.long
        ).to(self.device)
        block = table.gather(1, (positions // bs).clamp(max=width - 1))
        slots = block * bs + positions % bs
        if valid is not None:
            slots = torch.where(valid, slots, self.scratch * bs)
        self._set(table, slots.reshape(-1))
        key_pos = torch.arange(width * bs, device=self.device)
        self._mask = key_pos.view(1, 1, 1, -1) <= positions.unsqueeze(1).unsqueeze(-1)

    def prepare_decode(
        self, tables: Sequence[Sequence[int]], positions: list[int], uids: list[int]
    ) -> None:
        """``prepare`` for one token per row at ``positions`` of the sequences ``uids``: keys
        and values are read from the decode workspace instead of being gathered per layer."""
        bs = self.block_size
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions, strict=True)]
        self._slots = torch.tensor(slots, dtype=torch.long).to(self.device)
        self._tables = None
        self._rows = len(tables)
        self.workspace.prepare(uids, tables, positions, self.scratch)
        # additive mask (B, 1, S): -inf on slots past each row's position
        pos = torch.tensor(positions, device=self.device).unsqueeze(1)
        hidden = torch.arange(self.workspace.width, device=self.device).unsqueeze(0) > pos
        mask = torch.zeros(hidden.shape, device=self.device, dtype=self.k.dtype)
        self._mask = mask.masked_fill_(hidden, float("-inf")).unsqueeze(1)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy every layer's keys and values of block ``source`` into ``destination``."""
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        self.k.index_copy_(1, dst, self.k.index_select(1, src))
        self.v.index_copy_(1, dst, self.v.index_select(1, src))

    def _set(self, table: Tensor, slots: Tensor) -> None:
        self._tables = table.view(-1)
        self._rows = table.shape[0]
        self._slots = slots

    def store(self, layer: int, k: Tensor, v: Tensor, slots: Tensor) -> None:
        """Write keys and values (N, Hkv * dh) of ``layer`` into the pool's flat ``slots`` (N,)."""
        self.k[layer].view(-1, self.width).index_copy_(0, slots, k)
        self.v[layer].view(-1, self.width).index_copy_(0, slots, v)

    def decode_attention(self, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        """One query per row: q (B, 1, H, dh) over keys/values (B, S, Hkv * dh) with an additive
        mask (B, 1, S), as batched matmuls with no per-head key copy: (B, H, dh) x (B, dh, S)
        for one shared head, (B, Hkv, H / Hkv, dh) x (B, Hkv, dh, S) for grouped heads."""
        b, _, h, dh = q.shape
        hkv = self.kv_heads
        if hkv == 1:
            scores = torch.baddbmm(
                mask, q.reshape(b, h, dh), keys.transpose(1, 2), alpha=self.scale
            )
            return torch.bmm(scores.softmax(dim=-1), values).view(b, 1, h * dh)
        s = keys.shape[1]
        grouped = q.reshape(b, hkv, h // hkv, dh)
        keys = keys.view(b, s, hkv, dh).permute(0, 2, 3, 1)  # (B, Hkv, dh, S)
        values = values.view(b, s, hkv, dh).transpose(1, 2)  # (B, Hkv, S, dh)
        scores = torch.matmul(grouped, keys).mul_(self.scale).add_(mask.unsqueeze(1))
        return torch.matmul(scores.softmax(dim=-1), values).view(b, 1, h * dh)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """The model's ``AttentionCache``: store the new k/v (B, T, Hkv, dh) in the slots
        :meth:`prepare` (or :meth:`prepare_decode`) set up, then attend q (B, T, H, dh) over
        each row's cached keys, the new ones included; returns (B, T, H * dh)."""
        assert self._slots is not None and self._mask is not None
        k, v = k.reshape(-1, self.width), v.reshape(-1, self.width)
        self.store(layer, k, v, self._slots)
        if self._tables is None:  # decode: the workspace has every row's keys and values
            keys, values = self.workspace.write_and_read(layer, k, v)
            return self.decode_attention(q, keys, values, self._mask)
        shape = (self._rows, -1, self.kv_heads, self.dim_head)
        keys = self.k[layer].index_select(0, self._tables).view(shape)
        values = self.v[layer].index_select(0, self._tables).view(shape)
        return attention(q, keys, values, self._mask)
