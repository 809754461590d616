"""The engine core in its own process: the same streams, cancellation, hot swap, admission
and failure as the in-process front, across a real child process."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from conftest import VOCAB, collect_deltas, greedy_reference, random_policy, until

from server.engine import (
    EngineConfig,
    EngineOverloaded,
    FinishReason,
    ProcessEngine,
    SamplingParams,
)
from shared.checkpoints import CheckpointError, PolicyRegistry
from shared.tokenizer import ByteTokenizer

PROMPT = [87, 104, 97, 116, 32, 105, 115]
CONFIG = EngineConfig(num_blocks=256, block_size=4, num_threads=1)


async def test_greedy_streams_match_the_model_and_report_stats(registry: PolicyRegistry):
    async with await ProcessEngine(registry, CONFIG).start() as core:
        assert core.version == "v1" and core.tokenizer.vocab_size == VOCAB
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        streams = [core.generate(PROMPT, params) for _ in range(3)]
        results = await asyncio.gather(*(collect_deltas(s) for s in streams))
        n2 = await collect_deltas(core.generate(PROMPT, SamplingParams(n=2, max_tokens=5, seed=1)))
        await until(lambda: core.stats().running == 0)
        stats = core.stats()
    want = greedy_reference(registry.load("v1").model.eval(), PROMPT, 16, None)
    for by_index in results:
        deltas = by_index[0]
        ids = [t for d in deltas for t in d.token_ids]
        assert ids == want
        assert "".join(d.text for d in deltas) == ByteTokenizer(VOCAB).decode(ids)
        assert deltas[-1].finish_reason is FinishReason.LENGTH
        assert deltas[-1].metrics.output_tokens == 16
    assert sorted(n2) == [0, 1] and all(ds[-1].finished for ds in n2.values())
    assert stats.generated_tokens >= 3 * 16 + 2 and stats.requests_finished >= 5
    assert stats.kv_blocks_used == 0


async def test_cancelling_a_stream_frees_its_blocks(registry: PolicyRegistry):
    async with await ProcessEngine(registry, CONFIG).start() as core:
        long = SamplingParams(max_tokens=500, ignore_eos=True)
        stream = core.generate(PROMPT, long)
        async for _ in stream:
            break
        await stream.aclose()
        await until(lambda: core.stats().running == 0 and core.stats().requests_cancelled == 1)
        assert core.stats().kv_blocks_used == 0


async def test_a_hot_swap_serves_new_requests_and_a_corrupt_version_is_refused(
    registry: PolicyRegistry,
):
    v2 = registry.publish(random_policy(1), ByteTokenizer(VOCAB))
    v3 = registry.publish(random_policy(2), ByteTokenizer(VOCAB))
    (registry.path(v3) / "model.safetensors").write_bytes(b"not weights")
    async with await ProcessEngine(registry, CONFIG).start("v1") as core:
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        running = core.generate(PROMPT, SamplingParams(max_tokens=200, ignore_eos=True))
        first = await running.__anext__()
        assert await core.load_policy(v2) == v2 and core.version == v2
        swapped = await collect_deltas(core.generate(PROMPT, params))
        with pytest.raises(CheckpointError, match="sha256|truncated"):
            await core.load_policy(v3)
        assert core.version == v2
        rest = await collect_deltas(running)
    assert first.policy_version == "v1" and all(d.policy_version == "v1" for d in rest[0])
    assert rest[0][-1].finish_reason is FinishReason.LENGTH
    ids = [t for d in swapped[0] for t in d.token_ids]
    assert ids == greedy_reference(registry.load(v2).model.eval(), PROMPT, 8, None)
    assert swapped[0][-1].policy_version == v2


async def test_admission_is_refused_at_submission_as_in_process(registry: PolicyRegistry):
    config = EngineConfig(num_blocks=256, block_size=4, num_threads=1, max_waiting=2)
    async with await ProcessEngine(registry, config).start() as core:
        with pytest.raises(ValueError, match="prompt must have"):
            core.generate([65] * 5000, SamplingParams(max_tokens=1))
        with pytest.raises(ValueError, match="prompt must have"):
            core.generate([], SamplingParams(max_tokens=1))
        long = SamplingParams(max_tokens=50, ignore_eos=True)
        streams = [core.generate(PROMPT, long), core.generate(PROMPT, long)]
        with pytest.raises(EngineOverloaded):
            core.generate(PROMPT, long)
        for s in streams:
            await collect_deltas(s)


async def test_a_dead_core_fails_open_streams_and_new_requests(registry: PolicyRegistry):
    core = await ProcessEngine(registry, CONFIG).start()
    try:
        stream = core.generate(PROMPT, SamplingParams(max_tokens=5000, ignore_eos=True))
        await stream.__anext__()
        os.kill(core._proc.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="engine core exited"):
            await collect_deltas(stream)
        with pytest.raises(RuntimeError, match="not running"):
            core.generate(PROMPT, SamplingParams(max_tokens=1))
    finally:
        await core.aclose()


async def test_a_version_that_fails_to_load_fails_the_start(tmp_path):
    registry = PolicyRegistry(tmp_path / "policies")
    v1 = registry.publish(random_policy(0), ByteTokenizer(VOCAB))
    (registry.path(v1) / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(CheckpointError):
        await ProcessEngine(registry, CONFIG).start(v1)
