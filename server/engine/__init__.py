"""The serving engine: continuous batching over a paged KV cache (pure PyTorch).

    engine = AsyncEngine.from_registry(PolicyRegistry(root), config=EngineConfig())
    async for delta in engine.generate(prompt_ids, SamplingParams(temperature=0)):
        ...  # delta.token_ids, delta.text, delta.logprobs, delta.finish_reason, ...
    await engine.load_policy("v7")  # hot-swap; in-flight requests finish on their version

OpenMP workers that spin while they wait collapse throughput (20x and more, measured) when the
cores are shared, e.g. with a trainer on the same machine; sleeping workers cost the engine's
small ops little. The setting is read when torch loads, so set ``OMP_WAIT_POLICY=PASSIVE`` in
the environment of any process that imports torch before this package. The serving commands
instead let a worker spin a bounded 1,000-2,000 rounds (``shared/cli.py``), and the engine times
whether its wide decode steps gain from every core (``server/engine/cpu_kernels.py``).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from server.engine.async_engine import AsyncEngine, RequestStream
from server.engine.config import EngineConfig
from server.engine.llm_engine import EngineOverloaded, LLMEngine
from server.engine.outputs import Delta, RequestMetrics
from server.engine.sampling import SamplingParams
from server.engine.sequence import FinishReason, TokenLogprob
from server.engine.stats import EngineStats

__all__ = [
    "AsyncEngine",
    "RequestStream",
    "Delta",
    "EngineConfig",
    "EngineOverloaded",
    "EngineStats",
    "FinishReason",
    "LLMEngine",
    "RequestMetrics",
    "SamplingParams",
    "TokenLogprob",
]
