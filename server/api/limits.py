"""Per-key rate limiting (token bucket) and a request body size limit.

Limits are per gateway process: with N gateways behind a balancer a key gets up to N times the
rate, which is the usual trade for keeping gateways stateless.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.protocol import APIError


@dataclass(frozen=True, slots=True)
class Quota:
    """A key's standing after a request, as OpenAI's ``x-ratelimit-*-requests`` headers say
    it: the burst size, the whole requests left, and the seconds until the bucket is full."""

    limit: int
    remaining: int
    reset_seconds: float

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": str(self.limit),
            "x-ratelimit-remaining-requests": str(self.remaining),
            "x-ratelimit-reset-requests": _duration(self.reset_seconds),
        }


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``"1s"``, ``"6m0s"``, ``"1h2m3s"`` (rounded up to a second)."""
    total = max(0, math.ceil(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class RateLimiter:
    """``rate_per_minute`` requests per key, with bursts up to ``burst``."""

    def __init__(self, rate_per_minute: float, burst: int) -> None:
        self.rate = rate_per_minute / 60.0
        self.burst = float(burst)
        self._buckets: dict[int, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, key_id: int) -> Quota | None:
        """Take one token for ``key_id`` and return its quota (None: no limit), or raise a
        429 with ``Retry-After`` and the quota headers."""
        if self.rate <= 0:
            return None
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[key_id] = (tokens, now)
                wait = max(1, int((1.0 - tokens) / self.rate + 0.999))
                quota = self._quota(tokens)
                raise APIError(
                    429,
                    f"rate limit exceeded; retry in {wait} s",
                    type="rate_limit_error",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(wait), **quota.headers()},
                )
            self._buckets[key_id] = (tokens - 1.0, now)
            return self._quota(tokens - 1.0)

    def _quota(self, tokens: float) -> Quota:
        return Quota(int(self.burst), int(tokens), (self.burst - tokens) / self.rate)


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with a 413 before the app reads them whole."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        seen, too_large, rejected = 0, False, False

        async def limited() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    too_large = True
                    raise _TooLarge
            return message

        async def guarded(message: Message) -> None:
            # The app may catch _TooLarge while reading the body (FastAPI turns any body
            # error into a 400): once the limit is hit, its response becomes the 413.
            nonlocal rejected
            if not too_large:
                await send(message)
            elif not rejected:
                rejected = True
                await self._reject(send)

        try:
            await self.app(scope, limited, guarded)
        except _TooLarge:
            if not rejected:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        err = APIError(
            413, f"request body larger than {self.max_bytes} bytes", code="body_too_large"
        )
        body = json.dumps(err.body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
