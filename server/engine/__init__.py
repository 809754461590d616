"""The serving engine: continuous batching over a paged KV cache (pure PyTorch).

    engine = AsyncEngine(LLMEngine.from_registry(PolicyRegistry(root), config=EngineConfig()))
    async for delta in engine.generate(prompt_ids, SamplingParams(temperature=0)):
        ...  # delta.token_ids, delta.text, delta.logprobs, delta.finish_reason, ...
    await engine.load_policy("v7")  # hot-swap; in-flight requests finish on their version

Importing this package sets the OpenMP wait policy (``server/engine/openmp.py``) and nothing
heavier: the names below load on first use, so a command can import ``server.engine.openmp``
and still change the environment before torch loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from server.engine import openmp  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

if TYPE_CHECKING:
    from server.engine.async_engine import AsyncEngine, RequestStream
    from server.engine.config import EngineConfig
    from server.engine.core_process import ProcessEngine
    from server.engine.guided import GrammarError, GuidedDecoding
    from server.engine.llm_engine import EngineOverloaded, LLMEngine
    from server.engine.outputs import Delta, DeltaStream, RequestMetrics
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import FinishReason, TokenLogprob
    from server.engine.stats import EngineStats

_EXPORTS = {
    "AsyncEngine": "async_engine",
    "RequestStream": "async_engine",
    "EngineConfig": "config",
    "ProcessEngine": "core_process",
    "GrammarError": "guided",
    "GuidedDecoding": "guided",
    "EngineOverloaded": "llm_engine",
    "LLMEngine": "llm_engine",
    "Delta": "outputs",
    "DeltaStream": "outputs",
    "RequestMetrics": "outputs",
    "SamplingParams": "sampling",
    "FinishReason": "sequence",
    "TokenLogprob": "sequence",
    "EngineStats": "stats",
}

__all__ = [
    "AsyncEngine",
    "Delta",
    "DeltaStream",
    "EngineConfig",
    "EngineOverloaded",
    "EngineStats",
    "FinishReason",
    "GrammarError",
    "GuidedDecoding",
    "LLMEngine",
    "ProcessEngine",
    "RequestMetrics",
    "RequestStream",
    "SamplingParams",
    "TokenLogprob",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'server.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"server.engine.{_EXPORTS[name]}"), name)
