"""Streaming clients and checks shared by the load, disconnect and hot-swap tests.

The clients speak to a real server over loopback: SSE through ``httpx``, the WebSocket through
``websockets``. Each call returns a :class:`StreamResult` with what the client saw (completion
id, text, the policy version every part claimed, time to first token); the checks compare it
with what the server logged in its database.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets
from sqlalchemy.engine import Engine
from sqlmodel import select

from shared.db import session
from shared.schema import Message
from shared.store import storable


@dataclass
class StreamResult:
    """One streamed chat as the client saw it. ``status`` is ``ok`` (a complete answer:
    SSE ending in ``[DONE]``, a WebSocket ``done`` frame), ``overloaded`` (HTTP 429 with
    ``Retry-After`` / an ``overloaded`` error frame) or ``error`` (anything else)."""

    transport: str
    status: str = "error"
    completion_id: str | None = None
    text: str = ""
    versions: list[str] = field(default_factory=list)  # every version a chunk/frame claimed
    finish_reason: str | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    detail: str = ""
    prompt: str = ""
    started_at: float = 0.0  # time.monotonic() when sent
    finished_at: float = 0.0  # time.monotonic() when the answer was complete

    @property
    def version(self) -> str | None:
        return self.versions[-1] if self.versions else None

    def finished(self, started: float) -> StreamResult:
        """Close a stream read to its end (``started``: ``time.perf_counter()`` when sent)."""
        self.latency_s = time.perf_counter() - started
        self.finished_at = time.monotonic()
        self.status = "ok" if self.finish_reason in ("stop", "length") else "error"
        if self.status == "error":
            self.detail = f"finish_reason {self.finish_reason!r}"
        return self


def chat_body(prompt: str, **params: Any) -> dict[str, Any]:
    return {"model": "palmchat", "messages": [{"role": "user", "content": prompt}], **params}


async def sse_chat(
    client: httpx.AsyncClient, url: str, key: str, body: dict[str, Any], timeout: float = 60.0
) -> StreamResult:
    """POST a streaming chat completion and read it to the end."""
    res = StreamResult("sse", prompt=body["messages"][-1]["content"], started_at=time.monotonic())
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            async with client.stream(
                "POST",
                f"{url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={**body, "stream": True, "stream_options": {"include_usage": True}},
            ) as r:
                if r.status_code != 200:
                    raw = (await r.aread()).decode(errors="replace")
                    res.detail = f"HTTP {r.status_code}: {raw[:300]}"
                    code = _error_code(raw)
                    if (
                        r.status_code == 429
                        and code == "overloaded"
                        and r.headers.get("retry-after")
                    ):
                        res.status = "overloaded"
                    return res
                done = False
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        continue
                    if res.ttft_s is None:
                        res.ttft_s = time.perf_counter() - started
                    chunk = json.loads(data)
                    if "error" in chunk:
                        res.detail = f"error chunk: {data[:300]}"
                        return res
                    if res.completion_id is None:
                        res.completion_id = chunk["id"]
                    elif chunk["id"] != res.completion_id:
                        res.detail = f"chunk ids differ: {res.completion_id} / {chunk['id']}"
                        return res
                    if chunk.get("system_fingerprint"):
                        res.versions.append(chunk["system_fingerprint"])
                    for choice in chunk["choices"]:
                        res.text += choice["delta"].get("content") or ""
                        if choice.get("finish_reason"):
                            res.finish_reason = choice["finish_reason"]
                    if chunk.get("usage"):
                        res.completion_tokens = chunk["usage"]["completion_tokens"]
                if not done:
                    res.detail = "stream ended without [DONE]"
                    return res
    except TimeoutError:
        res.detail = f"timed out after {timeout} s"
        return res
    except Exception as e:  # a broken stream is a failure the test reports, not a crash
        res.detail = f"{type(e).__name__}: {e}"
        return res
    return res.finished(started)


def _error_code(raw: str) -> str | None:
    try:
        return json.loads(raw)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def ws_url(http_url: str) -> str:
    return http_url.replace("http://", "ws://", 1) + "/v1/chat/ws"


async def ws_connect(url: str, key: str):
    """Open an authenticated chat socket and wait for its ``ready`` frame."""
    ws = await websockets.connect(
        ws_url(url), additional_headers={"Authorization": f"Bearer {key}"}, open_timeout=30
    )
    frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
    if frame.get("type") != "ready":
        await ws.close()
        raise RuntimeError(f"no ready frame: {frame}")
    return ws


async def ws_chat(ws, request_id: str, body: dict[str, Any], timeout: float = 60.0) -> StreamResult:
    """Send one chat frame on an open socket (no other chat running on it) and read its
    frames up to ``done`` or ``error``."""
    res = StreamResult("ws", prompt=body["messages"][-1]["content"], started_at=time.monotonic())
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            await ws.send(json.dumps({"type": "chat", "request_id": request_id, **body}))
            while True:
                frame = json.loads(await ws.recv())
                if frame.get("request_id") != request_id:
                    res.detail = f"frame for another request: {frame}"
                    return res
                if res.ttft_s is None:
                    res.ttft_s = time.perf_counter() - started
                kind = frame["type"]
                if kind == "delta":
                    res.text += frame["content"]
                elif kind == "done":
                    res.completion_id = frame["completion_id"]
                    res.versions.append(frame["policy_version"])
                    res.finish_reason = frame["finish_reasons"][0]
                    res.completion_tokens = frame["usage"]["completion_tokens"]
                    if frame.get("cancelled"):
                        res.detail = "cancelled"
                        return res
                    break
                elif kind == "error":
                    res.detail = f"error frame: {frame['error']}"
                    if frame["error"].get("code") == "overloaded":
                        res.status = "overloaded"
                    return res
                else:
                    res.detail = f"unexpected frame {frame}"
                    return res
    except TimeoutError:
        res.detail = f"timed out after {timeout} s"
        return res
    except Exception as e:
        res.detail = f"{type(e).__name__}: {e}"
        return res
    return res.finished(started)


ChatBody = Callable[[int, int, random.Random], dict[str, Any]]


async def stream_until(
    url: str, keys: list[str], until: float, body: ChatBody
) -> list[StreamResult]:
    """One client per key, the first half over SSE and the rest over the WebSocket, each
    sending streaming chats back to back until ``time.monotonic()`` reaches ``until``.
    ``body(i, n, rng)`` is client ``i``'s ``n``-th chat, ``rng`` its own ``random.Random(i)``."""
    results: list[StreamResult] = []

    async def sse_client(i: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(i)
        for n in itertools.count():
            if time.monotonic() >= until:
                return
            results.append(await sse_chat(http, url, keys[i], body(i, n, rng)))

    async def ws_client(i: int) -> None:
        rng = random.Random(i)
        try:
            ws = await ws_connect(url, keys[i])
        except Exception as e:  # a socket that never opens is a failure the test reports
            results.append(StreamResult("ws", detail=f"connect: {type(e).__name__}: {e}"))
            return
        async with ws:
            for n in itertools.count():
                if time.monotonic() >= until:
                    return
                res = await ws_chat(ws, f"c{i}-{n}", body(i, n, rng))
                results.append(res)
                if res.status != "ok":
                    return  # the socket may be in any state; the error is recorded

    half = len(keys) // 2
    limits = httpx.Limits(max_connections=half, max_keepalive_connections=half)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(
            *[sse_client(i, http) for i in range(half)],
            *[ws_client(i) for i in range(half, len(keys))],
        )
    return results


def logged_answers(db: Engine) -> dict[str, list[Message]]:
    """Every logged assistant message, grouped by completion id."""
    with session(db) as s:
        rows = s.exec(select(Message).where(Message.role == "assistant")).all()
    out: dict[str, list[Message]] = {}
    for row in rows:
        out.setdefault(row.completion_id, []).append(row)
    return out


def check_logged_once(
    results: list[StreamResult], db: Engine, *, other_incomplete: bool = False
) -> list[str]:
    """Problems with the log of the complete answers in ``results``: each must be logged
    exactly once, complete, with the text (NUL stored as U+FFFD), finish reason, token count
    and policy version the client saw; and nothing else may be logged (but incomplete answers,
    with ``other_incomplete``)."""
    logged = logged_answers(db)
    problems = []
    seen: set[str] = set()
    for r in results:
        if r.status != "ok":
            continue
        seen.add(r.completion_id)
        rows = logged.get(r.completion_id, [])
        if len(rows) != 1:
            problems.append(f"{r.completion_id} ({r.transport}) logged {len(rows)} times")
            continue
        row = rows[0]
        for what, got, want in (
            ("content", row.content, storable(db, r.text)),
            ("incomplete", row.incomplete, False),
            ("finish_reason", row.finish_reason, r.finish_reason),
            ("completion_tokens", row.completion_tokens, r.completion_tokens),
            ("policy_version", row.policy_version, r.version),
        ):
            if got != want:
                problems.append(f"{r.completion_id} ({r.transport}): {what} {got!r} != {want!r}")
    extra = {
        cid
        for cid, rows in logged.items()
        if cid not in seen and not (other_incomplete and all(r.incomplete for r in rows))
    }
    if extra:
        problems.append(f"{len(extra)} logged completions no client received: {sorted(extra)[:5]}")
    return problems


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0-100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def scrape(url: str) -> dict[str, float]:
    """The server's ``/metrics`` as {sample name with labels: value}."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def metric_sum(values: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for sample, value in values.items():
        sample_name, _, rest = sample.partition("{")
        if sample_name != name:
            continue
        have = dict(part.split("=", 1) for part in rest.rstrip("}").split(",") if "=" in part)
        if all(have.get(k) == f'"{v}"' for k, v in labels.items()):
            total += value
    return total
