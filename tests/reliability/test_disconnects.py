"""Disconnects: clients that vanish mid-stream, over SSE and WebSocket, closing cleanly or
resetting the TCP connection, must not keep engine capacity and must leave their partial
answer in the log, marked incomplete.

A thread samples the engine's stats snapshot (taken after every step) all along. The engine
applies an abort between two steps, and its snapshot after that step counts the request as
cancelled. The tests check every snapshot: the batch holds exactly the chats neither cancelled
nor finished (a cancelled sequence never survives into the snapshot that counts it), and an
empty batch holds no KV block. So blocks come back within one engine step of the abort. They
also record how many steps passed between a client vanishing and its blocks being free (that
includes the server noticing the disconnect).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import select

from server.api.app import create_app
from shared.config import Settings
from shared.db import session
from shared.keys import create_key
from shared.schema import Message
from shared.store import storable
from tests.conftest import LiveServer
from tests.reliability._streams import (
    chat_body,
    check_logged_once,
    scrape,
    sse_chat,
    ws_chat,
    ws_connect,
)

pytestmark = pytest.mark.slow

MAX_TOKENS = 200  # with ignore_eos: no chat can finish before its client vanishes


@dataclass
class Cut:
    """A chat whose client vanishes after seeing some text."""

    prompt: str
    seen: str = ""
    seen_at: float = 0.0  # time.monotonic() when the client first had text


@dataclass
class Vanisher:
    """One connection: an SSE stream (one chat) or a WebSocket (one or two chats). It reads
    until every chat has text, waits for ``go``, then closes (``reset``: a TCP reset)."""

    transport: str
    cuts: list[Cut]
    reset: bool
    go: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, http: httpx.AsyncClient, url: str, key: str) -> None:
        if self.transport == "sse":
            await self._sse(http, url, key)
        else:
            await self._ws(url, key)

    async def _sse(self, http: httpx.AsyncClient, url: str, key: str) -> None:
        (cut,) = self.cuts
        body = chat_body(cut.prompt, max_tokens=MAX_TOKENS, ignore_eos=True, seed=1)
        async with http.stream(
            "POST",
            f"{url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={**body, "stream": True},
        ) as r:
            assert r.status_code == 200
            lines = r.aiter_lines()  # held open: a dropped iterator would close the stream now
            while not cut.seen:
                line = await anext(lines)
                if line.startswith("data: "):
                    for choice in json.loads(line[6:])["choices"]:
                        cut.seen += choice["delta"].get("content") or ""
            cut.seen_at = time.monotonic()
            await self.go.wait()
            if self.reset:
                _reset_on_close(r.extensions["network_stream"].get_extra_info("socket"))
        # leaving the block closes the connection: the body was not read to the end

    async def _ws(self, url: str, key: str) -> None:
        ws = await ws_connect(url, key)
        for i, cut in enumerate(self.cuts):
            body = chat_body(cut.prompt, max_tokens=MAX_TOKENS, ignore_eos=True, seed=i)
            await ws.send(json.dumps({"type": "chat", "request_id": str(i), **body}))
        async with asyncio.timeout(60):
            while not all(c.seen for c in self.cuts):
                frame = json.loads(await ws.recv())
                assert frame["type"] == "delta", frame
                cut = self.cuts[int(frame["request_id"])]
                cut.seen += frame["content"]
                cut.seen_at = cut.seen_at or time.monotonic()
        await self.go.wait()
        if self.reset:
            _reset_on_close(ws.transport.get_extra_info("socket"))
            ws.transport.abort()
        else:
            await ws.close()


def _reset_on_close(sock: socket.socket | None) -> None:
    """Make the next close a TCP reset: the client vanishes without a goodbye."""
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class StatsSampler(threading.Thread):
    """Records every new engine stats snapshot with the time it was first seen."""

    def __init__(self, engine) -> None:
        super().__init__(daemon=True)
        self.engine = engine
        self.samples: list[tuple[float, object]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        last = None
        while not self.halt.is_set():
            s = self.engine.stats()
            if s is not last:
                self.samples.append((time.monotonic(), s))
                last = s
            time.sleep(0.0005)

    def __enter__(self) -> StatsSampler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.halt.set()
        self.join()


def _check_snapshots(samples, since: float, started: int, base) -> list[str]:
    """Every snapshot first seen after ``since`` (when all ``started`` chats were admitted):
    the batch holds exactly the chats neither cancelled nor finished, and an empty batch holds
    no KV block."""
    problems = []
    for seen_at, s in samples:
        if seen_at < since:
            continue
        gone = (s.requests_cancelled - base.requests_cancelled) + (
            s.requests_finished - base.requests_finished
        )
        if s.running + s.waiting != started - gone:
            problems.append(
                f"step {s.steps}: {s.running} running + {s.waiting} waiting, but "
                f"{started} started and {gone} cancelled or finished"
            )
        if s.running == 0 and s.waiting == 0 and s.kv_blocks_used != 0:
            problems.append(f"step {s.steps}: nothing runs but {s.kv_blocks_used} blocks used")
    return problems


async def _until(predicate, limit: float = 30.0) -> None:
    async with asyncio.timeout(limit):
        while not predicate():
            await asyncio.sleep(0.002)


def _logged_for_prompt(db: Engine, prompt: str) -> list[Message]:
    with session(db) as s:
        convs = s.exec(
            select(Message.conversation_id).where(Message.role == "user", Message.content == prompt)
        ).all()
        return list(
            s.exec(
                select(Message).where(
                    Message.role == "assistant", Message.conversation_id.in_(convs)
                )
            ).all()
        )


async def _logged_incomplete(db: Engine, cuts: list[Cut], limit: float = 30.0) -> list[str]:
    """Problems with the log of the cut chats (written in the background after the cut): each
    logged once, incomplete, starting with the text its client saw, short of max_tokens."""
    deadline = time.monotonic() + limit
    while True:
        rows = {c.prompt: _logged_for_prompt(db, c.prompt) for c in cuts}
        if all(rows.values()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    problems = []
    for cut in cuts:
        logged = rows[cut.prompt]
        if len(logged) != 1:
            problems.append(f"{cut.prompt}: logged {len(logged)} times")
            continue
        row = logged[0]
        if not (
            row.incomplete
            and row.content.startswith(storable(db, cut.seen))
            and 1 <= row.completion_tokens < MAX_TOKENS
            and row.policy_version == "v1"
        ):
            problems.append(
                f"{cut.prompt}: incomplete={row.incomplete} tokens={row.completion_tokens} "
                f"seen={cut.seen!r} logged={row.content!r}"
            )
    return problems


def _app(tmp_path: Path, tiny_seed_dir: Path, database_url: str = ""):
    settings = Settings(data_dir=tmp_path, database_url=database_url, kv_cache_memory_mb=16)
    return create_app(settings, seed_dir=tiny_seed_dir)


def _vanishers(tag: str) -> list[Vanisher]:
    """8 SSE streams and 8 sockets (2 of them with two chats), half closing cleanly, half
    resetting the connection."""
    out = []
    for i in range(8):
        out.append(Vanisher("sse", [Cut(f"{tag} sse {i}: tell me a story")], reset=i % 2 == 1))
    for i in range(8):
        chats = 2 if i >= 6 else 1
        cuts = [Cut(f"{tag} ws {i}.{j}: tell me a story") for j in range(chats)]
        out.append(Vanisher("ws", cuts, reset=i % 2 == 1))
    return out


@pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_vanished_clients_free_blocks_within_one_step_and_are_logged_incomplete(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    tiny_seed_dir: Path,
    reliability_report,
    database: str,
) -> None:
    url = "" if database == "sqlite" else request.getfixturevalue("postgres_url")
    app = _app(tmp_path, tiny_seed_dir, url)
    state = app.state.palmchat
    vanishers = _vanishers("gone")
    cuts = [c for v in vanishers for c in v.cuts]
    waves = [vanishers[i::3] for i in range(3)]  # each wave mixes SSE and WebSocket
    steps_to_free, ms_to_free = [], []
    with LiveServer(app) as live:
        engine = state.engine
        key = create_key(state.db, "vanisher")
        base = engine.stats()
        async with httpx.AsyncClient(timeout=60) as http:
            with StatsSampler(engine) as sampler:
                tasks = [asyncio.ensure_future(v.run(http, live.url, key)) for v in vanishers]
                await _until(lambda: all(c.seen for c in cuts) or any(t.done() for t in tasks), 60)
                admitted_by = time.monotonic()
                gone = 0
                for wave in waves:  # vanish in three waves while the rest keep streaming
                    for v in wave:
                        v.go.set()
                    await asyncio.gather(*[tasks[vanishers.index(v)] for v in wave])
                    vanished_at, vanished_step = time.monotonic(), engine.stats().steps
                    gone += sum(len(v.cuts) for v in wave)
                    await _until(
                        lambda: engine.stats().requests_cancelled - base.requests_cancelled >= gone  # noqa: B023 (awaited inside this iteration)
                    )
                    steps_to_free.append(engine.stats().steps - vanished_step)
                    ms_to_free.append(round((time.monotonic() - vanished_at) * 1000, 1))
                await _until(lambda: engine.stats().kv_blocks_used == 0)
        problems = _check_snapshots(sampler.samples, admitted_by, len(cuts), base)
        log_problems = await _logged_incomplete(state.db, cuts)
        after = scrape(live.url)
        stats = engine.stats()

    reliability_report.record(
        "disconnects" if database == "sqlite" else "disconnects_postgres",
        database=database,
        vanished_sse=sum(v.transport == "sse" for v in vanishers),
        vanished_ws_sockets=sum(v.transport == "ws" for v in vanishers),
        vanished_chats=len(cuts),
        reset_connections=sum(v.reset for v in vanishers),
        cancelled_by_engine=stats.requests_cancelled - base.requests_cancelled,
        engine_snapshots_checked=sum(1 for t, _ in sampler.samples if t >= admitted_by),
        snapshot_violations=len(problems),
        max_engine_steps_from_vanish_to_blocks_free=max(steps_to_free),
        max_ms_from_vanish_to_blocks_free=max(ms_to_free),
        logged_incomplete=len(cuts) - len(log_problems),
        items_lost=len(log_problems),
    )
    assert all(t.exception() is None for t in tasks)
    assert not problems, problems[:10]
    assert stats.requests_cancelled - base.requests_cancelled == len(cuts)
    assert stats.requests_finished == base.requests_finished  # none ran on to max_tokens
    assert stats.running == 0 and stats.waiting == 0 and stats.kv_blocks_used == 0
    assert after["palmchat_num_requests_running"] == 0
    assert after["palmchat_kv_cache_usage_perc"] == 0
    assert not log_problems, log_problems


async def test_neighbours_of_vanished_clients_finish_untouched(
    tmp_path: Path, tiny_seed_dir: Path, reliability_report
) -> None:
    """While chats vanish, the others in the same batch (SSE and WebSocket) stream on to the
    end, complete and logged once; the batch shrinks by exactly the vanished chats in the step
    that cancels them."""
    app = _app(tmp_path, tiny_seed_dir)
    state = app.state.palmchat
    vanishers = _vanishers("cut")
    cuts = [c for v in vanishers for c in v.cuts]
    keep = dict(max_tokens=64, ignore_eos=True, temperature=0)
    with LiveServer(app) as live:
        engine = state.engine
        key = create_key(state.db, "neighbours")
        base = engine.stats()
        async with httpx.AsyncClient(timeout=60) as http:
            sockets = [await ws_connect(live.url, key) for _ in range(3)]
            with StatsSampler(engine) as sampler:
                stayers = [
                    *[
                        asyncio.ensure_future(
                            sse_chat(http, live.url, key, chat_body(f"stay sse {i}", **keep))
                        )
                        for i in range(3)
                    ],
                    *[
                        asyncio.ensure_future(ws_chat(ws, "s", chat_body(f"stay ws {i}", **keep)))
                        for i, ws in enumerate(sockets)
                    ],
                ]
                await _until(lambda: engine.stats().running >= len(stayers), 60)
                tasks = [asyncio.ensure_future(v.run(http, live.url, key)) for v in vanishers]
                await _until(lambda: all(c.seen for c in cuts) or any(t.done() for t in tasks), 60)
                admitted_by = time.monotonic()
                for v in vanishers:
                    v.go.set()
                await asyncio.gather(*tasks)
                stayed = await asyncio.gather(*stayers)
                await _until(lambda: engine.stats().kv_blocks_used == 0)
            for ws in sockets:
                await ws.close()
        started = len(cuts) + len(stayers)
        problems = _check_snapshots(sampler.samples, admitted_by, started, base)
        cut_problems = await _logged_incomplete(state.db, cuts)
        stayer_problems = check_logged_once(stayed, state.db, other_incomplete=True)
        stats = engine.stats()

    reliability_report.record(
        "disconnects",
        neighbours=len(stayed),
        neighbours_ok=sum(r.status == "ok" for r in stayed),
        neighbours_vanished_chats=len(cuts),
        neighbour_snapshot_violations=len(problems),
    )
    assert [r.status for r in stayed] == ["ok"] * len(stayed), [r.detail for r in stayed]
    assert all(r.finish_reason == "length" and r.completion_tokens == 64 for r in stayed)
    assert not stayer_problems, stayer_problems
    assert not cut_problems, cut_problems
    assert not problems, problems[:10]
    assert stats.requests_cancelled - base.requests_cancelled == len(cuts)
    assert stats.running == 0 and stats.kv_blocks_used == 0
