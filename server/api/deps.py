"""Request dependencies: the app's shared state and the caller resolved from an API key."""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Depends, Request
from fastapi.requests import HTTPConnection
from sqlalchemy.engine import Engine

from server.api.appliers import is_unavailable
from server.api.batching import GroupRunner
from server.api.limits import Quota, RateLimiter
from server.api.protocol import APIError
from server.api.spool import WriteSpool
from shared.checkpoints import PolicyRegistry
from shared.config import Settings
from shared.keys import Principal, resolve_keys
from shared.rollout.state import Canary

if TYPE_CHECKING:
    from server.api.metrics import Metrics
    from server.api.moderation import ModerationHook
    from server.api.serving import Backend


class KeyCache:
    """The principals of keys this server resolved lately (by the key's SHA-256, LRU-bounded).

    Used only while the database cannot be reached, so that callers seen before an outage
    keep chatting through it; a key revoked during the outage works until it ends."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._entries: OrderedDict[str, Principal] = OrderedDict()

    @staticmethod
    def _digest(key: str) -> str:
        return hashlib.sha256(key.encode("utf-8")).hexdigest()

    def remember(self, key: str, principal: Principal | None) -> None:
        digest = self._digest(key)
        if principal is None:
            self._entries.pop(digest, None)
            return
        self._entries[digest] = principal
        self._entries.move_to_end(digest)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def get(self, key: str) -> Principal | None:
        return self._entries.get(self._digest(key))


@dataclass
class AppState:
    """What every route shares: settings, database, registry, the serving backend, metrics."""

    settings: Settings
    db: Engine
    registry: PolicyRegistry
    metrics: Metrics
    auth: bool = True
    local: Principal | None = None  # who everyone is when auth is off (a real "local" user)
    # commit-or-spool for conversation logs and feedback (None: write to the database only)
    spool: WriteSpool | None = None
    keys: KeyCache = field(default_factory=KeyCache)
    rate_limiter: RateLimiter | None = None
    # the in-process engine or Triton; None until the app starts one (or is given one)
    engine: Backend | None = None
    backend: Literal["engine", "process", "triton"] = "engine"  # what the app starts
    triton_url: str | None = None  # with backend "triton": HOST:PORT of its gRPC endpoint
    started_at: float = 0.0
    # re-reads the active policy now (an admin route's change); set while the app runs
    on_policy_change: Callable[[], Awaitable[None]] | None = None
    policy_sync_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    moderation: ModerationHook | None = None  # the chat hook and /v1/moderations' classifier
    canary: Canary | None = None  # the canary the engine serves beside the active version

    # writes of a kind that concurrent requests make in one transaction (server.api.writes)
    write_groups: dict[str, GroupRunner[Any, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # every request's key is looked up again (a revoked key stops at once), concurrent
        # requests' keys in one query
        self.key_lookup: GroupRunner[str, Principal | None] = GroupRunner(
            lambda keys: resolve_keys(self.db, keys)
        )

    def check_rate(self, principal: Principal) -> Quota | None:
        """429 when ``principal``'s key is over its rate limit; else its quota (None: no
        limit)."""
        if self.rate_limiter is not None:
            return self.rate_limiter.check(principal.key_id)
        return None


def state_of(connection: HTTPConnection) -> AppState:
    return connection.app.state.palmchat


async def get_state(connection: HTTPConnection) -> AppState:
    """The dependency: async, as FastAPI runs a plain function's dependency on a worker
    thread, a thread hop per request for an attribute read."""
    return state_of(connection)


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def authenticate(state: AppState, key: str | None) -> Principal:
    """The principal for ``key``; 401 in OpenAI's shape when missing, unknown or revoked."""
    if not state.auth:
        assert state.local is not None
        return state.local
    if not key:
        raise APIError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            type="authentication_error",
            code="invalid_api_key",
        )
    try:
        principal = await state.key_lookup(key)
    except Exception as e:
        if not is_unavailable(e):
            raise
        principal = state.keys.get(key)
        if principal is None:
            raise APIError(
                503,
                "the database is unavailable and this API key cannot be checked; retry shortly",
                type="service_unavailable",
                code="database_unavailable",
                headers={"Retry-After": "2"},
            ) from None
        return principal
    state.keys.remember(key, principal)
    if principal is None:
        raise APIError(
            401, "invalid or revoked API key", type="authentication_error", code="invalid_api_key"
        )
    return principal


async def get_principal(request: Request) -> Principal:
    state = state_of(request)
    principal = await authenticate(state, bearer_token(request.headers.get("authorization")))
    request.state.principal = principal
    quota = state.check_rate(principal)
    if quota is not None:  # sent as x-ratelimit-* headers (server.api.metrics.CountRequests)
        request.state.quota = quota
    return principal


async def get_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.is_admin:
        raise APIError(403, "this route needs an admin key", type="permission_error")
    return principal


State = Annotated[AppState, Depends(get_state)]
CurrentUser = Annotated[Principal, Depends(get_principal)]
Admin = Annotated[Principal, Depends(get_admin)]
