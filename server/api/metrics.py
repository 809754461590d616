"""Prometheus metrics of the gateway, vLLM-style names with a ``palmchat_`` prefix.

Histograms and counters are updated as requests finish; engine gauges and counters are read
from the engine's stats snapshot at scrape time, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from server.api.serving import Backend
    from server.engine import RequestMetrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class EngineCollector:
    def __init__(self, get_engine: Callable[[], Backend | None]) -> None:
        self.get_engine = get_engine

    def collect(self) -> Iterator[Metric]:
        engine = self.get_engine()
        if engine is None:
            return
        s = engine.stats()
        yield GaugeMetricFamily(
            "palmchat_num_requests_running", "Sequences in the running batch.", value=s.running
        )
        yield GaugeMetricFamily(
            "palmchat_num_requests_waiting", "Sequences waiting to be scheduled.", value=s.waiting
        )
        usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        yield GaugeMetricFamily(
            "palmchat_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", value=usage
        )
        for name, doc, value in (
            (
                "palmchat_prefix_cache_queries",
                "Prompt blocks looked up in the prefix cache.",
                s.prefix_cache_queries,
            ),
            (
                "palmchat_prefix_cache_hits",
                "Prompt blocks served from the prefix cache.",
                s.prefix_cache_hits,
            ),
            ("palmchat_prompt_tokens", "Prompt tokens admitted.", s.prompt_tokens),
            ("palmchat_generation_tokens", "Tokens generated.", s.generated_tokens),
            ("palmchat_preemptions", "Sequences preempted for lack of KV blocks.", s.preemptions),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        threads = GaugeMetricFamily(
            "palmchat_decode_threads",
            "CPU threads the decode steps of this many rows run on (timed: 1 or every core).",
            labels=["rows"],
        )
        for rows, count in s.decode_threads.items():
            threads.add_metric([rows], count)
        yield threads
        info = InfoMetricFamily("palmchat_policy", "The policy version serving new requests.")
        info.add_metric([], {"version": engine.version})
        yield info


class Metrics:
    def __init__(self, get_engine: Callable[[], Backend | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry

        def seconds(name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
            return Histogram(f"palmchat_{name}_seconds", doc, buckets=buckets, registry=r)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"palmchat_{name}", doc, labels, registry=r)

        self.requests = counter(
            "requests",
            "Finished requests (HTTP, and each WebSocket chat) by endpoint, HTTP status class "
            "and error code.",
            ("endpoint", "status", "code"),
        )
        self.finished = counter(
            "request_success",
            "Finished generations (each of a request's n choices) by finish reason.",
            ("finish_reason",),
        )
        self.ttft = seconds("time_to_first_token", "Time to first token.")
        self.itl = seconds("inter_token_latency", "Time between output tokens.", TOKEN_BUCKETS)
        self.e2e = seconds("e2e_request_latency", "Request latency, end to end.")
        self.queue = seconds("request_queue_time", "Time spent waiting to be scheduled.")
        self.feedback = counter(
            "feedback", "Thumbs by rating and policy version.", ("rating", "policy_version")
        )
        self.swaps = counter("policy_swaps", "Hot-swaps to a new policy version.")
        self.moderation = counter(
            "moderation",
            "Moderation decisions on chat input and output, by flagged category ('none' when "
            "nothing was flagged) and action (allow, flag, block).",
            ("stage", "category", "action"),
        )
        self.moderation_errors = counter(
            "moderation_errors",
            "Moderation checks that got no verdict (no classifier, or the external one failed).",
            ("stage",),
        )
        for stage in ("input", "output", "api"):  # exposed from the start, so rates are 0
            self.moderation_errors.labels(stage)
        for stage in ("input", "output"):
            self.moderation.labels(stage, "none", "allow")
        self.moderation_seconds = seconds(
            "moderation", "Time to classify one moderation batch.", TOKEN_BUCKETS
        )
        self.moderation_up = Gauge(
            "palmchat_moderation_classifier_up",
            "1 while a moderation classifier answers, 0 after a failed check or with none.",
            registry=r,
        )
        self.canary_share = Gauge(
            "palmchat_canary_share",
            "The share of users this gateway serves the canary version (0: no canary).",
            registry=r,
        )
        r.register(EngineCollector(get_engine))

    def count(self, endpoint: str, status: int, code: str | None) -> None:
        """One finished request: ``status`` the HTTP status (WebSocket chats: the status the
        same error would have over HTTP), ``code`` its error code (None on success)."""
        self.requests.labels(endpoint, f"{status // 100}xx", code or "").inc()

    def observe_candidate(self, m: RequestMetrics) -> None:
        self.queue.observe(m.queue_time)
        if m.time_to_first_token is not None:
            self.ttft.observe(m.time_to_first_token)
        for gap in m.inter_token_latencies:
            self.itl.observe(gap)


def error_code_of(scope: Scope) -> str | None:
    state: Any = scope.get("state") or {}
    return state.get("error_code") if isinstance(state, dict) else None


class CountRequests:
    """Pure ASGI middleware: counts every finished HTTP request in ``palmchat_requests_total``
    (endpoint = the matched route's path, ``unmatched`` for none; the error code the error
    handlers noted, else the status) and adds a key's ``x-ratelimit-*`` headers. Pure ASGI,
    so SSE streams pass through unbuffered."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == "/metrics":  # scrapes are not traffic
            await self.app(scope, receive, send)
            return
        status = 500  # no response at all counts as a server error

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                state: Any = scope.get("state") or {}
                quota = state.get("quota") if isinstance(state, dict) else None
                if quota is not None:
                    extra = [(k.encode(), v.encode()) for k, v in quota.headers().items()]
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            code = error_code_of(scope)
            if status >= 400 and not code:
                code = str(status)
            self.metrics.count(endpoint, status, code)
