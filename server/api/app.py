"""The FastAPI application: routers, error handlers, shared state. ``uvicorn`` runs it.

palmchat serve            # or: uvicorn --factory server.api.app:create_app_from_env
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from server.api.deps import AppState, State
from server.api.errors import install_error_handlers
from server.api.limits import BodySizeLimit, RateLimiter
from server.api.protocol import APIError
from server.api.routes import conversations, feedback, policies
from shared.bootstrap import SEED_DIR, prepare
from shared.config import Settings
from shared.db import ping

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(
    settings: Settings, *, auth: bool = True, seed_dir: Path = SEED_DIR, **extras: Any
) -> FastAPI:
    """Build the app over the data dir / database named by ``settings``.

    Auth can be turned off only for a server bound to loopback: anyone who can reach the
    port could otherwise read every user's conversations.
    """
    if not auth and not is_loopback(settings.host):
        raise ValueError(f"refusing to disable auth on non-loopback host {settings.host!r}")
    prepared = prepare(settings, seed_dir=seed_dir)
    app = FastAPI(title="palmchat", version="0.1.0")
    extras.setdefault(
        "rate_limiter", RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
    )
    app.state.palmchat = AppState(
        settings=settings, db=prepared.engine, registry=prepared.registry, auth=auth, extras=extras
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    install_error_handlers(app)
    app.include_router(conversations.router)
    app.include_router(feedback.router)
    app.include_router(policies.router)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz(state: State) -> dict[str, str]:
        try:
            await run_in_threadpool(ping, state.db)
        except Exception as e:  # any driver error means "not ready", reported, not raised
            raise APIError(503, f"database unreachable: {e}", type="service_unavailable") from None
        return {"status": "ready"}

    return app


def create_app_from_env() -> FastAPI:
    return create_app(Settings())
