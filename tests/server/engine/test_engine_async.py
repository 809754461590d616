"""The async front: streamed deltas, cancellation, policy hot-swap, corrupt versions, stats."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import VOCAB, collect_deltas, greedy_reference, random_policy

from server.engine import AsyncEngine, EngineOverloaded, FinishReason, SamplingParams
from shared.checkpoints import CheckpointError
from shared.tokenizer import ByteTokenizer

END = 260
PROMPTS = [[72, 105, 33], [87, 104, 97, 116, 32, 105, 115], [49, 43, 49, 61], [65] * 13]


async def _wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_stream_yields_deltas_whose_text_and_ids_add_up(make_engine):
    engine = make_engine()
    async with AsyncEngine(engine) as front:
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        deltas = (await collect_deltas(front.generate(PROMPTS[1], params)))[0]
    ids = [t for d in deltas for t in d.token_ids]
    assert ids == greedy_reference(engine.current.runner.model, PROMPTS[1], 16, None)
    assert "".join(d.text for d in deltas) == ByteTokenizer(VOCAB).decode(ids)
    assert [d.finish_reason for d in deltas][-1] is FinishReason.LENGTH
    assert all(d.policy_version == "v1" for d in deltas)
    metrics = deltas[-1].metrics
    assert metrics.output_tokens == 16 and metrics.prompt_tokens == len(PROMPTS[1])
    assert 0 <= metrics.queue_time <= metrics.time_to_first_token
    assert len(metrics.inter_token_latencies) == 15
    assert all(x >= 0 for x in metrics.inter_token_latencies)


async def test_cancelling_a_stream_frees_its_blocks_at_the_next_step(make_engine):
    engine = make_engine()
    async with AsyncEngine(engine) as front:
        long = SamplingParams(temperature=1.0, max_tokens=500, ignore_eos=True)
        stream = front.generate(PROMPTS[0], long)
        other = front.generate(PROMPTS[2], long)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 5:
                break
        assert front.stats().kv_blocks_used > 0
        await stream.aclose()
        await _wait_until(lambda: front.stats().running == 1)
        other.cancel()
        await _wait_until(lambda: front.stats().running == 0)
        assert front.stats().kv_blocks_used == 0
        assert front.stats().requests_cancelled == 2
        rest = await collect_deltas(other)
        assert rest[0][-1].finish_reason is FinishReason.CANCELLED
        assert sum(len(d.token_ids) for d in rest[0]) < 500


async def test_a_consumer_task_cancelled_mid_stream_cancels_its_request(make_engine):
    engine = make_engine()
    async with AsyncEngine(engine) as front:
        stream = front.generate(PROMPTS[0], SamplingParams(max_tokens=800, ignore_eos=True))

        async def consume():
            async for _ in stream:
                pass

        task = asyncio.create_task(consume())
        await _wait_until(lambda: front.stats().generated_tokens > 3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _wait_until(lambda: front.stats().running == 0 and front.stats().waiting == 0)
        assert front.stats().kv_blocks_used == 0


async def test_hot_swap_mid_stream_keeps_each_request_on_its_version_and_drops_none(
    registry, make_engine
):
    registry.publish(random_policy(1), ByteTokenizer(VOCAB), parent="v1")
    v1_model, v2_model = registry.load("v1").model, registry.load("v2").model
    engine = make_engine()
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    async with AsyncEngine(engine) as front:
        old = [front.generate(p, params) for p in PROMPTS]
        old_tasks = [asyncio.create_task(collect_deltas(s)) for s in old]
        await _wait_until(lambda: front.stats().generated_tokens >= 20)
        assert await front.load_policy("v2") == "v2"
        new_tasks = [
            asyncio.create_task(collect_deltas(front.generate(p, params))) for p in PROMPTS
        ]
        old_out = await asyncio.gather(*old_tasks)
        new_out = await asyncio.gather(*new_tasks)
        await _wait_until(lambda: front.stats().policy_versions == ["v2"])
    for prompt, out in zip(PROMPTS, old_out, strict=True):
        deltas = out[0]
        assert {d.policy_version for d in deltas} == {"v1"}
        assert deltas[-1].finish_reason is FinishReason.LENGTH
        assert [t for d in deltas for t in d.token_ids] == greedy_reference(
            v1_model, prompt, 40, None
        )
    for prompt, out in zip(PROMPTS, new_out, strict=True):
        deltas = out[0]
        assert {d.policy_version for d in deltas} == {"v2"}
        assert [t for d in deltas for t in d.token_ids] == greedy_reference(
            v2_model, prompt, 40, None
        )


async def test_a_corrupt_version_is_refused_and_the_current_one_keeps_serving(
    registry, make_engine
):
    version = registry.publish(random_policy(2), ByteTokenizer(VOCAB), parent="v1")
    weights = registry.path(version) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    async with AsyncEngine(make_engine()) as front:
        stream = front.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=30))
        with pytest.raises(CheckpointError, match=version):
            await front.load_policy(version)
        assert front.version == "v1"
        out = await collect_deltas(stream)
        later = await collect_deltas(front.generate(PROMPTS[1], SamplingParams(max_tokens=5)))
    assert out[0][-1].finish_reason is not None
    assert {d.policy_version for d in out[0] + later[0]} == {"v1"}


async def test_overflowing_the_waiting_queue_raises_overloaded(make_engine):
    # one sequence runs at a time, so later requests pile up in the waiting queue
    async with AsyncEngine(make_engine(max_waiting=3, max_num_seqs=1)) as front:
        params = SamplingParams(max_tokens=400, ignore_eos=True)
        streams = []
        with pytest.raises(EngineOverloaded, match="waiting queue is full"):
            for _ in range(20):
                streams.append(front.generate(PROMPTS[0], params))
        assert 3 <= len(streams) <= 4
        for s in streams:
            s.cancel()
        await _wait_until(lambda: front.stats().requests_cancelled == len(streams))
        assert front.stats().waiting == 0
        # room again: accepted
        out = await collect_deltas(front.generate(PROMPTS[1], SamplingParams(max_tokens=2)))
    assert out[0][-1].finish_reason is not None


async def test_stats_count_tokens_blocks_and_prefix_hits(make_engine):
    async with AsyncEngine(make_engine(block_size=4)) as front:
        system = list(range(40, 60))
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        await collect_deltas(front.generate(system + [70, 71], params))
        await collect_deltas(front.generate(system + [80], params))
        await _wait_until(lambda: front.stats().requests_finished == 2)
        stats = front.stats()
    assert stats.generated_tokens == 12
    assert stats.prompt_tokens == 22 + 21
    assert stats.prefix_cache_hits == 5  # the 20-token system prompt = 5 blocks of 4
    assert stats.kv_blocks_total == 256 and stats.kv_blocks_used == 0
    assert stats.running == 0 and stats.waiting == 0
    assert len(stats.recent) == 2 and stats.recent[0].time_to_first_token > 0
