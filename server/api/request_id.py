"""Request ids: every HTTP response (and WebSocket handshake) carries ``X-Request-Id``, and
every log record made while that request is handled carries the same id.

A client's own ``X-Request-Id`` is echoed when it is at most :data:`MAX_LENGTH` characters of
printable ASCII (so it can neither split a log line nor a header); otherwise, or when none is
sent, a fresh one is made, as vLLM's server does with ``--enable-request-id-headers``.

The id lives in a contextvar for the request's task. :func:`install` wraps the log record
factory, so records from every logger get it, whatever handlers are configured and whenever
they were added: as ``record.request_id`` (``-`` outside a request; for formats with
``%(request_id)s``) and appended to the message as ``[request_id=...]``, so that the plain
formats print it too and an operator can grep one request's lines.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
MAX_LENGTH = 128
_ACCEPTED = re.compile(rf"[\x20-\x7e]{{1,{MAX_LENGTH}}}")
# the messages that open a response: an HTTP one, a WebSocket's accept or its refusal
_STARTS = ("http.response.start", "websocket.accept", "websocket.http.response.start")

_current: ContextVar[str | None] = ContextVar("palmchat_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request being handled in this context, or None."""
    return _current.get()


def new_request_id() -> str:
    return uuid.uuid4().hex


def client_request_id(scope: Scope) -> str | None:
    """The client's ``X-Request-Id`` if it is one to echo, else None."""
    for name, value in scope.get("headers", ()):
        if name.lower() == HEADER:
            text = value.decode("latin-1").strip()
            return text if _ACCEPTED.fullmatch(text) else None
    return None


class RequestIdMiddleware:
    """Pure ASGI middleware (no buffering: SSE streams and WebSockets pass through as they
    are) that names each HTTP request and WebSocket with an id, sets it for the request's
    logs and adds it to the response's headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = client_request_id(scope) or new_request_id()
        header = (HEADER, request_id.encode("ascii"))

        async def sending(message: Message) -> None:
            if message["type"] in _STARTS:
                kept = [(k, v) for k, v in message.get("headers", ()) if k.lower() != HEADER]
                message = {**message, "headers": [*kept, header]}
            await send(message)

        token = _current.set(request_id)
        try:
            await self.app(scope, receive, sending)
        finally:
            _current.reset(token)


def _tag(record: logging.LogRecord, request_id: str) -> None:
    suffix = f" [request_id={request_id}]"
    if record.args:  # the message is still to be %-formatted with them
        suffix = suffix.replace("%", "%%")
    record.msg = f"{record.msg}{suffix}"


def install() -> None:
    """Give every log record the request id of the context it is made in (once per
    process; later calls find the factory already wrapped)."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "palmchat_request_id", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        request_id = _current.get()
        record.request_id = request_id or "-"
        if request_id is not None:
            _tag(record, request_id)
        return record

    factory.palmchat_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
