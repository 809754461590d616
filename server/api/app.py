"""The FastAPI application: routers, error handlers, shared state. ``uvicorn`` runs it.

palmchat serve            # or: uvicorn --factory server.api.app:create_app_from_env
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import fastapi_offline
from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp

from server.api import chat_log, redact, request_id, writes
from server.api.appliers import is_unavailable
from server.api.deps import AppState, State
from server.api.errors import install_error_handlers
from server.api.limits import BodySizeLimit, RateLimiter
from server.api.metrics import CountRequests, Metrics
from server.api.moderation import LocalModerator, ModerationHook, Moderator, RemoteModerator
from server.api.protocol import APIError
from server.api.request_id import RequestIdMiddleware
from server.api.routes import (
    admin,
    chat,
    completions,
    conversations,
    feedback,
    moderations,
    policies,
    tokenize,
    web,
    ws,
)
from server.api.serving import Backend
from server.api.spool import WriteSpool
from server.engine import AsyncEngine, EngineConfig, LLMEngine, ProcessEngine
from shared.bootstrap import SEED_DIR, prepare
from shared.checkpoints import CheckpointError
from shared.config import Settings
from shared.db import ping
from shared.keys import local_principal
from shared.moderation import ModerationRegistry
from shared.policies import active_version
from shared.rollout.state import Canary, canary_of

log = logging.getLogger(__name__)

SHUTDOWN_WRITE_SECONDS = 5.0  # how long a stopping server waits for pending log writes

try:
    VERSION = metadata.version("palmchat")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "unknown"

DESCRIPTION = f"""palmchat's OpenAI-compatible chat API, with vLLM's extras (`/tokenize`,
`/detokenize`, `/health`, `/version`, `max_model_len` on model cards).

Routes under `/v1` and the tokenizer routes take `Authorization: Bearer <key>`. Errors use
OpenAI's shape `{{"error": {{"message", "type", "param", "code"}}}}`. Every response carries
`X-Request-Id`: the client's own when it sent one (printable ASCII, at most
{request_id.MAX_LENGTH} characters), else a fresh one; the server's log lines for that request
end with `[request_id=...]`.

## WebSocket /v1/chat/ws

OpenAPI has no WebSocket operations, so the protocol is described here. Connect to
`ws://HOST:PORT/v1/chat/ws` with the key in `Authorization`, in `?api_key=`, or in a first
`auth` frame. Every frame is a JSON object with a `type`.

{inspect.cleandoc(ws.__doc__ or "")}
"""

# Swagger UI and ReDoc from the fastapi-offline package, so the docs work without internet
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"
DOCS_ASSET_NAMES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


class PalmchatAPI(FastAPI):
    def build_middleware_stack(self) -> ASGIApp:
        # outside Starlette's ServerErrorMiddleware, so that its 500s carry the id too
        return RequestIdMiddleware(super().build_middleware_stack())


def _install_docs(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) and ``/redoc`` on local copies of their files: FastAPI's own
    pages load them from a CDN."""
    assert app.openapi_url is not None and app.swagger_ui_oauth2_redirect_url is not None
    openapi_url, redirect_url = app.openapi_url, app.swagger_ui_oauth2_redirect_url

    def under_root(request: Request, path: str) -> str:
        return f"{request.scope.get('root_path', '')}{path}"

    def asset(request: Request, name: str) -> str:
        return under_root(request, f"/docs/assets/{name}")

    def page(request: Request, name: str) -> dict[str, Any]:
        """What both documentation pages take: the schema's URL and the page's title."""
        return {"openapi_url": under_root(request, openapi_url), "title": f"{app.title} - {name}"}

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            **page(request, "Swagger UI"),
            swagger_js_url=asset(request, "swagger-ui-bundle.js"),
            swagger_css_url=asset(request, "swagger-ui.css"),
            swagger_favicon_url=asset(request, "favicon.png"),
            oauth2_redirect_url=redirect_url,
        )

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            **page(request, "ReDoc"),
            redoc_js_url=asset(request, "redoc.standalone.js"),
            redoc_favicon_url=asset(request, "favicon.png"),
            with_google_fonts=False,
        )

    @app.get("/docs/assets/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> FileResponse:
        if name not in DOCS_ASSET_NAMES:
            raise APIError(404, "not found", type="not_found_error")
        return FileResponse(DOCS_ASSETS / name, headers={"X-Content-Type-Options": "nosniff"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the engine on the active policy, a watcher that hot-swaps to whatever the
    ``policies`` table says is active (an admin's activation or the trainer's publish), and
    the write spool's replay (which first takes over what a stopped server left spooled)."""
    state: AppState = app.state.palmchat
    state.started_at = time.time()
    state.policy_sync_lock = asyncio.Lock()  # one per event loop the app runs on
    own_engine = state.engine is None
    if own_engine:
        state.engine = await _start_backend(state)
    if state.spool is not None:
        await run_in_threadpool(state.spool.start)
    watcher = asyncio.create_task(_watch_active_policy(state))

    async def sync_now() -> None:
        await _sync_policy(state)

    state.on_policy_change = sync_now
    try:
        yield
    finally:
        watcher.cancel()
        if state.moderation is not None and isinstance(state.moderation.moderator, RemoteModerator):
            await state.moderation.moderator.aclose()
        # logs of cut-off completions still being written, then what is left in the spool
        if chat_log.pending_writes:
            await asyncio.wait(set(chat_log.pending_writes), timeout=SHUTDOWN_WRITE_SECONDS)
        if state.spool is not None:
            await run_in_threadpool(state.spool.stop, SHUTDOWN_WRITE_SECONDS)
        if own_engine and state.engine is not None:
            engine, state.engine = state.engine, None
            await engine.aclose()


async def _start_backend(state: AppState) -> Backend:
    """The backend ``state.backend`` names, serving the active policy."""
    version = await run_in_threadpool(active_version, state.db)
    config = EngineConfig.from_settings(state.settings)
    if state.backend == "triton":  # palmchat serve --backend triton
        from server.triton.client import TritonBackend

        assert state.triton_url is not None  # create_app checked
        return await TritonBackend(state.triton_url, state.registry, engine=config).connect(version)
    if state.backend == "process":  # palmchat serve --backend process
        return await ProcessEngine(state.registry, config).start(version)
    return AsyncEngine(LLMEngine.from_registry(state.registry, version, config))


async def _sync_policy(state: AppState) -> None:
    # One sync at a time: an admin route's and the watcher's would otherwise both load the
    # same version (the second failing with "already loaded") or both count one swap.
    async with state.policy_sync_lock:
        engine = state.engine
        if engine is None:
            return
        wanted = await run_in_threadpool(active_version, state.db)
        if wanted and wanted != engine.version:
            try:
                await engine.load_policy(wanted)
                state.metrics.swaps.inc()
                log.info("hot-swapped to policy %s", wanted)
            except CheckpointError as e:
                log.error("refusing to serve %s: %s; keeping %s", wanted, e, engine.version)
            except Exception:  # the table already says what to serve; the watcher retries
                log.exception("hot-swap to %s failed; keeping %s", wanted, engine.version)
        await _sync_canary(state, engine, await run_in_threadpool(canary_of, state.db))


async def _sync_canary(state: AppState, engine: Backend, canary: Canary | None) -> None:
    """Serve the table's canary beside the active version (or nothing, once it ended)."""
    for version in engine.serving_beside:
        if canary is None or version != canary.version:
            await engine.release(version)
            log.info("canary %s no longer served", version)
    if canary is not None and canary.version != engine.version:
        if canary.version not in engine.serving_beside:
            try:
                await engine.load_policy(canary.version, beside=True)
                log.info("serving canary %s to %.0f%% of users", canary.version, canary.share * 100)
            except Exception as e:  # a damaged version, or a backend without canaries
                log.error("cannot serve canary %s: %s", canary.version, e)
                canary = None
    else:
        canary = None
    state.canary = canary
    state.metrics.canary_share.set(canary.share if canary is not None else 0.0)


def _serving(state: AppState) -> str | None:
    return state.engine.version if state.engine is not None else None


async def _watch_active_policy(state: AppState) -> None:
    while True:
        await asyncio.sleep(state.settings.policy_poll_seconds)
        if state.moderation is not None:
            await run_in_threadpool(state.moderation.refresh)  # a newly trained classifier
        try:
            await _sync_policy(state)
        except Exception as e:  # a DB hiccup must not kill the watcher
            if is_unavailable(e):
                log.warning("policy watcher: database unavailable; keeping %s", _serving(state))
            else:
                log.exception("policy watcher")


def create_app(
    settings: Settings,
    *,
    auth: bool = True,
    seed_dir: Path = SEED_DIR,
    engine: Backend | None = None,
    backend: Literal["engine", "process", "triton"] = "engine",
    triton_url: str | None = None,
) -> FastAPI:
    """Build the app over the data dir / database named by ``settings``.

    It serves through ``engine`` when given (the caller owns it), else it starts ``backend``
    on the active policy: the in-process engine, or the Triton server at ``triton_url``.
    Auth can be turned off only for a server bound to loopback: anyone who can reach the
    port could otherwise read every user's conversations.
    """
    if not auth and not is_loopback(settings.host):
        raise ValueError(f"refusing to disable auth on non-loopback host {settings.host!r}")
    if backend == "triton" and not triton_url:
        raise ValueError("the triton backend needs triton_url (HOST:PORT of its gRPC endpoint)")
    prepared = prepare(settings, seed_dir=seed_dir)
    redact.install()  # no API key (the WebSocket's ?api_key=) in uvicorn's logs
    request_id.install()
    app = PalmchatAPI(
        title="palmchat",
        version=VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # _install_docs serves both pages from local files
        redoc_url=None,
    )
    app.state.palmchat = AppState(
        settings=settings,
        db=prepared.engine,
        registry=prepared.registry,
        metrics=Metrics(lambda: app.state.palmchat.engine),
        auth=auth,
        local=None if auth else local_principal(prepared.engine),
        rate_limiter=RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst),
        engine=engine,
        backend=backend,
        triton_url=triton_url,
    )
    state = app.state.palmchat
    state.moderation = moderation_hook(settings, prepared.moderation, state.metrics)
    state.spool = WriteSpool(
        settings.data_dir / "spool", prepared.engine, on_applied=writes.on_applied(state)
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    # outermost: it counts every response, the 413s above and unhandled errors included
    app.add_middleware(CountRequests, metrics=state.metrics)
    install_error_handlers(app)
    app.include_router(admin.router)
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(conversations.router)
    app.include_router(feedback.router)
    app.include_router(moderations.router)
    app.include_router(policies.router)
    app.include_router(ws.router)
    app.include_router(tokenize.router)
    app.include_router(web.router)
    _install_docs(app)

    @app.get("/metrics", tags=["ops"], include_in_schema=False)
    async def metrics(state: State) -> Response:
        registry = state.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health", tags=["ops"], response_class=Response)
    async def health() -> Response:
        """vLLM's liveness probe: 200 with an empty body."""
        return Response(status_code=200)

    @app.get("/version", tags=["ops"])
    async def version() -> dict[str, str]:
        return {"version": VERSION}

    @app.get("/readyz", tags=["ops"])
    async def readyz(state: State) -> dict[str, str]:
        engine = state.engine
        if engine is None:
            raise APIError(503, "no policy loaded yet", type="service_unavailable")
        try:
            await run_in_threadpool(ping, state.db)
        except Exception as e:  # any driver error means "not ready", reported, not raised
            raise APIError(503, f"database unreachable: {e}", type="service_unavailable") from None
        return {"status": "ready", "policy_version": engine.version}

    return app


def moderation_hook(
    settings: Settings, registry: ModerationRegistry, metrics: Metrics
) -> ModerationHook:
    """The chat moderation hook the settings ask for: palmchat's own classifier (the latest in
    the moderation registry) or the external server at ``moderation_url``."""
    moderator: Moderator = (
        RemoteModerator(settings.moderation_url, settings.moderation_api_key)
        if settings.moderation_url
        else LocalModerator(registry)
    )
    hook = ModerationHook(moderator, settings.moderation_mode, settings.moderation_fail, metrics)
    hook.refresh()
    if settings.moderation_mode != "off" and not moderator.version and not settings.moderation_url:
        log.warning(
            "no moderation classifier in %s: chats are served unchecked (moderation_fail=%s)",
            registry.root,
            settings.moderation_fail,
        )
    return hook


def create_app_from_env() -> FastAPI:
    return create_app(Settings())
