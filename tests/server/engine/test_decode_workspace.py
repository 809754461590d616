"""The decode workspace never hands attention a non-finite key or value, whatever memory it
was built over: a NaN in a masked slot still poisons a row (NaN * 0 in the value product)."""

from __future__ import annotations

import torch

from server.engine.decode_workspace import DecodeWorkspace


def test_a_workspace_rebuilt_over_memory_that_held_nans_is_all_finite() -> None:
    layers, blocks, block_size, dh = 2, 16, 4, 8
    k_pool = torch.randn(layers, blocks + 1, block_size, dh)
    v_pool = torch.randn(layers, blocks + 1, block_size, dh)
    for _ in range(20):
        ws = DecodeWorkspace(k_pool, v_pool, max_len=64, headroom=16)
        # leave NaN-filled chunks of the workspace's own size for the allocator to hand out
        for _ in range(8):
            junk = torch.full((layers * 2 * 24 * dh,), float("nan"))
            del junk
        ws.prepare([1, 2], [[0, 1], [2]], [6, 2], scratch=blocks)
        assert ws.k is not None and ws.v is not None
        assert torch.isfinite(ws.k).all() and torch.isfinite(ws.v).all()
        # the rows' real keys are the pool's
        assert torch.equal(ws.k[:, 0, :8], k_pool[:, :2].reshape(layers, 8, dh))
        assert torch.equal(ws.v[:, 1, :4], v_pool[:, 2])
