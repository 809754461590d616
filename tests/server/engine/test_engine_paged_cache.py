"""The engine's model path: paged-cache prefill/decode logits equal the plain full forward,
and the block manager shares, frees and evicts blocks as the engine relies on."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy_reference, random_policy

from server.engine.block_manager import BlockManager
from server.engine.kv_cache import PagedKVCache
from server.engine.sampling import SamplingParams
from server.engine.sequence import Sequence
from shared.model import KVCache, PaLM, PaLMConfig


def _seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, 0, tokens, SamplingParams(), "v1")


@pytest.mark.parametrize("qk_rmsnorm", [False, True])
def test_forward_with_a_contiguous_cache_equals_forward_without(qk_rmsnorm):
    torch.manual_seed(0)
    cfg = PaLMConfig(num_tokens=300, dim=64, depth=2, heads=4, dim_head=16, qk_rmsnorm=qk_rmsnorm)
    model = PaLM(cfg).eval()
    tokens = torch.randint(0, 300, (2, 12))
    positions = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        full = model(tokens)
        step = model(tokens, positions, KVCache.allocate(cfg, 2, 16))
        last = model(tokens, positions, KVCache.allocate(cfg, 2, 16), last=torch.tensor([11, 4]))
    assert (step - full).abs().max() < 1e-4
    assert (last - full[[0, 1], [11, 4]]).abs().max() < 1e-4


def test_paged_ragged_prefill_then_decode_equals_full_forward():
    model = random_policy(3)
    blocks = BlockManager(num_blocks=32, block_size=4)
    cache = PagedKVCache(model.config, 32, 4, torch.device("cpu"), torch.float32)
    prompts = [list(range(10, 23)), list(range(40, 45)), [7]]
    seqs = [_seq(p, str(i)) for i, p in enumerate(prompts)]
    for s in seqs:
        blocks.allocate(s)
    width = max(map(len, prompts))
    tokens = torch.zeros(3, width, dtype=torch.long)
    positions = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
        positions[i] = torch.arange(width).clamp(max=len(p) - 1)
    lengths = torch.tensor([len(p) for p in prompts])
    valid = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    with torch.no_grad():
        cache.prepare([s.block_table for s in seqs], positions, valid)
        logits = model(tokens, positions, cache, last=lengths - 1)
        for i, p in enumerate(prompts):
            assert (logits[i] - model(torch.tensor([p]))[0, -1]).abs().max() < 1e-4
        for _ in range(6):  # decode, crossing block boundaries
            nxt = logits.argmax(-1).tolist()
            for s, t in zip(seqs, nxt, strict=True):
                s.token_ids.append(t)
                blocks.append_slot(s)
            step_pos = torch.tensor([[s.num_tokens - 1] for s in seqs])
            cache.prepare([s.block_table for s in seqs], step_pos)
            logits = model(torch.tensor([[t] for t in nxt]), step_pos, cache)[:, 0]
            for i, s in enumerate(seqs):
                ref = model(torch.tensor([s.token_ids]))[0, -1]
                assert (logits[i] - ref).abs().max() < 1e-4


def test_shared_prefix_blocks_are_reused_refcounted_and_freed():
    blocks = BlockManager(num_blocks=8, block_size=4)
    a, b = _seq(list(range(10)), "a"), _seq(list(range(9)) + [99], "b")
    blocks.allocate(a)
    assert blocks.waits_for_prefix(b)  # a has not run its prefill yet
    blocks.mark_ready(a)
    assert not blocks.waits_for_prefix(b)
    blocks.allocate(b)
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert blocks.num_used == 4  # 2 shared + one last block each
    blocks.free(a)
    assert blocks.num_used == 3
    blocks.free(b)
    assert blocks.num_used == 0
    # freed blocks keep their hash: a later identical prefix still hits
    c = _seq(list(range(9)) + [5], "c")
    blocks.allocate(c)
    assert c.num_cached_tokens == 8


def test_the_block_holding_the_last_prompt_token_is_never_shared():
    blocks = BlockManager(num_blocks=8, block_size=4)
    a = _seq(list(range(8)), "a")
    blocks.allocate(a)
    blocks.mark_ready(a)
    b = _seq(list(range(8)), "b")
    blocks.allocate(b)
    assert b.num_cached_tokens == 4  # the second block holds the last token: recomputed
    assert b.block_table[1] != a.block_table[1]


def test_decode_workspace_regrows_and_rebuilds_without_changing_the_output(make_engine):
    engine = make_engine()
    workspace = engine.current.runner.cache.workspace
    workspace.headroom = 3  # regrow every few steps
    rebuilds = []
    original = workspace._rebuild
    workspace._rebuild = lambda *a: (rebuilds.append(1), original(*a))
    prompts = [list(range(40, 47)), list(range(60, 75)), [33]]
    lengths = [30, 9, 17]  # finishing at different steps changes the batch
    ids = [
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        for p, n in zip(prompts, lengths, strict=True)
    ]
    out: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for d in engine.step():
            out[d.request_id] += d.token_ids
    model = engine.current.runner.model
    for rid, prompt, n in zip(ids, prompts, lengths, strict=True):
        assert out[rid] == greedy_reference(model, prompt, n, None)
    assert len(rebuilds) > 3
