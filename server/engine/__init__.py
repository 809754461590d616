"""The serving engine: continuous batching over a paged KV cache (pure PyTorch).

engine = LLMEngine.from_registry(PolicyRegistry(root), config=EngineConfig())
async_engine = AsyncEngine(engine)
async for delta in async_engine.generate(prompt_ids, SamplingParams(temperature=0)):
    ...
"""

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
