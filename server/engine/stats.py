"""Engine statistics for metrics: gauges (a snapshot) and counters since start."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from server.engine.outputs import RequestMetrics


@dataclass(slots=True)
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_cache_queries: int = 0  # full prompt blocks looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, reused without recomputation
    prompt_tokens: int = 0  # tokens in: prompt tokens of admitted candidates
    prefill_tokens: int = 0  # prompt tokens actually computed (misses of the prefix cache)
    generated_tokens: int = 0  # tokens out
    requests_finished: int = 0
    requests_cancelled: int = 0
    preemptions: int = 0
    steps: int = 0
    policy_versions: list[str] = field(default_factory=list)
    # CPU: threads the timed decode steps of each size class run on, e.g. {"32-63": 2}
    decode_threads: dict[str, int] = field(default_factory=dict)
    # the last finished candidates' timings, newest last
    recent: deque[RequestMetrics] = field(default_factory=lambda: deque(maxlen=1024), repr=False)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )

    def snapshot(self) -> EngineStats:
        copy = EngineStats(**{f: getattr(self, f) for f in self.__slots__ if f != "recent"})
        copy.policy_versions = list(self.policy_versions)
        copy.decode_threads = dict(self.decode_threads)
        copy.recent = deque(self.recent, maxlen=1024)
        return copy
