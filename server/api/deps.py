"""Request dependencies: the app's shared state and the caller resolved from an API key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.engine import Engine

from server.api.protocol import APIError
from shared.checkpoints import PolicyRegistry
from shared.config import Settings
from shared.keys import Principal, resolve_key


@dataclass
class AppState:
    settings: Settings
    db: Engine
    registry: PolicyRegistry
    auth: bool = True
    extras: dict[str, Any] = field(default_factory=dict)
    local: Principal | None = None  # who everyone is when auth is off (a real "local" user)


def get_state(request: Request) -> AppState:
    return request.app.state.palmchat


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
    principal = await run_in_threadpool(resolve_key, state.db, key)
    if principal is None:
        raise APIError(
            401, "invalid or revoked API key", type="authentication_error", code="invalid_api_key"
        )
    return principal


async def get_principal(request: Request) -> Principal:
    state = get_state(request)
    principal = await authenticate(state, bearer_token(request.headers.get("authorization")))
    request.state.principal = principal
    limiter = state.extras.get("rate_limiter")
    if limiter is not None:
        limiter.check(principal.key_id)
    return principal


async def get_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.is_admin:
        raise APIError(403, "this route needs an admin key", type="permission_error")
    return principal


State = Annotated[AppState, Depends(get_state)]
CurrentUser = Annotated[Principal, Depends(get_principal)]
Admin = Annotated[Principal, Depends(get_admin)]
