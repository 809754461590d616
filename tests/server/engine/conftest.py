"""Tiny random-weight policies in a temporary registry, and unbatched greedy references."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from server.engine import EngineConfig, LLMEngine
from shared.checkpoints import PolicyRegistry
from shared.model import PaLM, PaLMConfig
from shared.tokenizer import ByteTokenizer

VOCAB = 300


def random_policy(seed: int) -> PaLM:
    """A tiny PaLM whose weights are large enough that its logits have no near-ties."""
    torch.manual_seed(seed)
    model = PaLM(PaLMConfig(num_tokens=VOCAB, dim=64, depth=2, heads=4, dim_head=16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture
def registry(tmp_path: Path) -> PolicyRegistry:
    registry = PolicyRegistry(tmp_path / "policies")
    registry.publish(random_policy(0), ByteTokenizer(VOCAB))
    return registry


@pytest.fixture
def make_engine(registry: PolicyRegistry) -> Callable[..., LLMEngine]:
    def make(version: str = "v1", **config: object) -> LLMEngine:
        config = {"num_blocks": 256, "block_size": 4, "num_threads": 1, **config}
        return LLMEngine.from_registry(registry, version, EngineConfig(**config))

    return make


@torch.no_grad()
def greedy_reference(
    model: PaLM, prompt: list[int], max_tokens: int, end_id: int | None
) -> list[int]:
    """Greedy continuation by full forward passes, no cache and no batching."""
    tokens = list(prompt)
    out: list[int] = []
    for _ in range(max_tokens):
        nxt = int(model(torch.tensor([tokens]))[0, -1].argmax())
        if nxt == end_id:
            break
        out.append(nxt)
        tokens.append(nxt)
    return out


def run_with_arrivals(
    engine: LLMEngine, prompts: list[list[int]], params: object, every: int = 3
) -> list[tuple[list[int], list[int]]]:
    """Step ``engine`` to the end, adding one of ``prompts`` every ``every`` steps (so requests
    join a batch mid-stream); returns each prompt with the token ids it got."""
    pending, ids, outputs, steps = list(prompts), {}, {}, 0
    while pending or engine.has_work():
        if pending and steps % every == 0:
            prompt = pending.pop(0)
            ids[engine.add_request(prompt, params)] = prompt
        for d in engine.step():
            outputs.setdefault(d.request_id, []).extend(d.token_ids)
        steps += 1
    return [(prompt, outputs[rid]) for rid, prompt in ids.items()]


async def collect_deltas(stream) -> dict[int, list]:
    """Every delta of a stream, by candidate index, in order."""
    by_index: dict[int, list] = {}
    async for d in stream:
        by_index.setdefault(d.index, []).append(d)
    return by_index


async def until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait (polling) until ``predicate()`` holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)
