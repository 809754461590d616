"""Fixed-shape decode steps (recorded as CUDA graphs on a GPU, run eagerly on CPU): the same
tokens as the eager engine and as unbatched full forwards, through arrivals, preemption,
seeded sampling and hot swap. Every test runs on CPU, and on CUDA too where there is one."""

from __future__ import annotations

import random
import time

import pytest
import torch
from conftest import greedy_reference, run_with_arrivals

from server.engine import EngineConfig, LLMEngine, SamplingParams
from server.engine.cuda_graphs import GraphDecoder, StaticDecode, buckets
from server.engine.kv_cache import PagedKVCache
from shared.checkpoints import PolicyRegistry

END = 260  # ByteTokenizer(300).end_id
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def _prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(32, 127) for _ in range(9)]
    return [
        (system if i % 2 else []) + [rng.randrange(32, 127) for _ in range(rng.randrange(1, 40))]
        for i in range(count)
    ]


def _engine(registry: PolicyRegistry, device: str, **config: object) -> LLMEngine:
    values = {"num_blocks": 256, "block_size": 4, "num_threads": 1, "max_num_seqs": 16}
    values |= {"device": device, "dtype": "float32", "cuda_graphs": True, **config}
    return LLMEngine.from_registry(registry, "v1", EngineConfig(**values))


def test_buckets_cover_every_batch_size_up_to_the_limit():
    assert buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert buckets(1) == [1]
    decoder = GraphDecoder.__new__(GraphDecoder)
    decoder.buckets = buckets(48)
    assert [decoder.bucket(n) for n in (1, 3, 17, 33, 48, 49)] == [1, 4, 32, 48, 48, None]


@pytest.mark.parametrize("device", DEVICES)
def test_a_fixed_shape_step_gives_the_eager_steps_logits_and_writes_the_same_cache(
    registry, device
):
    engine = _engine(registry, device, cuda_graphs=False)
    worker = engine.current
    for p in _prompts(5, seed=1):  # five sequences of different lengths, prefilled
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=10))
    while len(worker.scheduler.running) < 5:
        engine.step()
    batch = worker.scheduler.schedule(time.perf_counter())  # a decode step, slots allocated
    assert batch is not None and not batch.is_prefill
    seqs = batch.seqs
    assert len(seqs) == 5
    runner, cache = worker.runner, worker.runner.cache
    saved = cache.k.clone(), cache.v.clone()
    eager = runner.decode(seqs).float().clone()
    after_eager = cache.k.clone(), cache.v.clone()
    cache.k.copy_(saved[0])
    cache.v.copy_(saved[1])
    static = StaticDecode(runner.model, cache, rows=8)  # 3 padding rows
    with torch.inference_mode():
        static.load(
            [s.token_ids[-1] for s in seqs],
            [s.num_tokens - 1 for s in seqs],
            [s.block_table for s in seqs],
        )
        fixed = static.forward()[:5].float()
    torch.testing.assert_close(fixed, eager, rtol=1e-5, atol=1e-5)
    # every real slot holds the same keys and values; padding wrote only the scratch block
    real = slice(0, cache.scratch)
    torch.testing.assert_close(cache.k[:, real], after_eager[0][:, real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.v[:, real], after_eager[1][:, real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_with_requests_arriving_mid_stream_equals_unbatched_full_forwards(registry, device):
    engine = _engine(registry, device)
    reference = registry.load("v1").model  # float32 on CPU, no cache
    params = SamplingParams(temperature=0, max_tokens=24)
    for prompt, tokens in run_with_arrivals(engine, _prompts(7, seed=3), params):
        assert tokens == greedy_reference(reference, prompt, 24, END)
    graphs = engine.current.runner.graphs
    assert graphs is not None and graphs.replays > 0
    if device == "cuda":  # the batch grew 1 -> 7 rows: buckets 1, 2, 4, 8 were recorded
        assert graphs.recorded == [1, 2, 4, 8]


@pytest.mark.parametrize("device", DEVICES)
def test_preemption_under_a_tiny_pool_still_gives_every_request_its_greedy_text(registry, device):
    engine = _engine(registry, device, num_blocks=12)
    reference = registry.load("v1").model
    prompts = [p[:8] for p in _prompts(6, seed=5)]  # 6 x 28 tokens do not fit 48 slots
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = engine.generate(prompts, params)
    assert engine.stats().preemptions > 0
    for prompt, (out,) in zip(prompts, outs, strict=True):
        assert out.token_ids == greedy_reference(reference, prompt, 20, None)
    assert engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_sampling_is_the_same_alone_and_in_a_batch_of_another_bucket(registry, device):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=77)
    prompt = _prompts(1, seed=8)[0]
    alone = _engine(registry, device).generate([prompt], params)[0][0]
    crowd = _engine(registry, device)
    noisy = SamplingParams(temperature=1.2, max_tokens=30)
    others = [crowd.add_request(p, noisy) for p in _prompts(5, seed=9)]
    target = crowd.add_request(prompt, params)
    got: list[int] = []
    while crowd.has_work():
        got += [t for d in crowd.step() if d.request_id == target for t in d.token_ids]
    assert len(others) == 5
    assert got == alone.token_ids


@pytest.mark.parametrize("device", DEVICES)
def test_candidates_forked_from_one_prefill_decode_like_separate_requests(registry, device):
    prompt = _prompts(1, seed=13)[0] + [65, 66, 67]  # ends inside a block: one block copied
    seeded = dict(temperature=1.0, max_tokens=16, ignore_eos=True)
    engine = _engine(registry, device)
    forked = engine.generate([prompt], SamplingParams(n=3, seed=5, **seeded))[0]
    assert engine.stats().prefill_tokens == len(prompt)
    for i, candidate in enumerate(forked):
        alone = _engine(registry, device).generate([prompt], SamplingParams(seed=5 + i, **seeded))[
            0
        ][0]
        assert candidate.token_ids == alone.token_ids


@pytest.mark.parametrize("device", DEVICES)
def test_the_default_dtype_serves_complete_answers_and_hot_swaps(registry, device):
    """The device's own dtype (bfloat16 on CUDA): every request completes on its version,
    while a second version is loaded mid-stream and new requests go to it."""
    registry.publish(registry.load("v1").model, registry.load("v1").tokenizer)  # v2
    config = EngineConfig(num_blocks=256, block_size=4, device=device, cuda_graphs=True)
    engine = LLMEngine.from_registry(registry, "v1", config)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    first = [engine.add_request(p, params) for p in _prompts(3, seed=11)]
    done: dict[str, tuple[int, str]] = {}
    counts: dict[str, int] = {}
    for step in range(200):
        if step == 3:
            engine.load_policy("v2")
            later = [engine.add_request(p, params) for p in _prompts(2, seed=12)]
        for d in engine.step():
            counts[d.request_id] = counts.get(d.request_id, 0) + len(d.token_ids)
            if d.finish_reason is not None:
                done[d.request_id] = (counts[d.request_id], d.policy_version)
        if not engine.has_work():
            break
    assert {rid: done[rid] for rid in first} == {rid: (12, "v1") for rid in first}
    assert {rid: done[rid] for rid in later} == {rid: (12, "v2") for rid in later}
    assert engine.version == "v2" and list(engine.workers) == ["v2"]


def test_cpu_engines_decode_eagerly_unless_asked(registry):
    assert EngineConfig(device="cpu").graph_decode() is False
    assert EngineConfig(device="cpu", cuda_graphs=True).graph_decode() is True
    assert _engine(registry, "cpu", cuda_graphs=None).current.runner.graphs is None
    cache = PagedKVCache(registry.load("v1").model.config, 8, 4, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        StaticDecode(registry.load("v1").model, cache, rows=1).load([1, 2], [0, 0], [[0], [1]])
