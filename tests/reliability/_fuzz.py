"""What the fuzz tests share: the server's error log, the OpenAI error shape, a healthy server
after every case, and reading a WebSocket up to a client frame's answer.

Every fuzz test runs against SQLite and PostgreSQL (the production database). After every case
the server must still answer a normal chat completion, and its log must hold no unhandled
error (``log.exception`` of the app, uvicorn's "Exception in ASGI application", asyncio's "Task
exception was never retrieved").
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import httpx

ERROR_TYPES_4XX = {
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "rate_limit_error",
}
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


class ErrorLog(logging.Handler):
    """Collects ERROR records from the app, uvicorn and asyncio while the server runs."""

    LOGGERS = ("", "uvicorn", "uvicorn.error", "asyncio")

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self._records_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._records_lock:
            self.records.append(record)

    def __enter__(self) -> ErrorLog:
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)

    def text(self) -> str:
        fmt = logging.Formatter("%(name)s: %(message)s")
        return "\n".join(fmt.format(r) for r in self.records)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_healthy(server) -> None:
    """The server still answers a normal request, and logged no unhandled error so far."""
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        headers=auth(server.user_key),
        json={"model": "palmchat", "messages": MESSAGES, "max_tokens": 3},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert not server.errors.records, f"the server logged errors:\n{server.errors.text()}"


def assert_openai_error(r: httpx.Response, status: int | None = None) -> dict[str, Any]:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    if status is not None:
        assert r.status_code == status, r.text[:500]
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] in ERROR_TYPES_4XX and body["error"]["message"]
    return body["error"]


def post_chat(server, content: str) -> httpx.Response:
    """A two-token chat completion of one user message, with the plain user's key."""
    return httpx.post(
        f"{server.url}/v1/chat/completions",
        headers=auth(server.user_key),
        json={
            "model": "palmchat",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 2,
        },
        timeout=60,
    )


def until_terminal(ws, deadline_s: float = 60.0) -> dict[str, Any]:
    """Read frames up to the one that ends the last client frame: error, done or feedback."""
    end = time.monotonic() + deadline_s
    while True:
        frame = json.loads(ws.recv(timeout=max(0.1, end - time.monotonic())))
        assert isinstance(frame, dict) and "type" in frame, frame
        if frame["type"] in ("error", "done", "feedback"):
            return frame
        assert frame["type"] == "delta", frame
