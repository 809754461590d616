"""Faults: the database going away. Real processes, the real PostgreSQL at 127.0.0.1:5432,
real files; nothing of palmchat is mocked. Figures go to the ``faults`` section of the
reliability report.

* DB outage: a server on PostgreSQL reaches it through a TCP relay that the test cuts (every
  connection reset, new ones refused) and restores. Chat keeps streaming; thumbs and rankings
  are answered 202 once fsynced into the spool; every write answered 2xx is in the database
  after recovery, with the last vote winning.
* A server SIGKILLed during an outage: a new server on the same data dir replays its spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from server.api.app import create_app
from shared.bootstrap import prepare
from shared.config import Settings
from shared.keys import create_key
from tests.conftest import LiveServer, free_port
from tests.reliability._databases import live_settings
from tests.reliability._faults import REPO, Api, is_openai_error, wait_for

PG = ("127.0.0.1", 5432)
OUTAGE_S = 4.0  # how long the database stays away in the outage test


class TcpRelay:
    """A loopback TCP relay in front of PostgreSQL that can be cut and restored on one port.

    ``cut()`` closes the listening socket and every relayed connection (the database looks
    gone: open connections break, new ones are refused); ``restore()`` listens again."""

    def __init__(self, target: tuple[str, int] = PG) -> None:
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None

    def url(self, postgres_url: str) -> str:
        return postgres_url.replace(f"{PG[0]}:{PG[1]}", f"127.0.0.1:{self.port}")

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR on POSIX
        listener.settimeout(0.05)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def relay() -> Iterator[TcpRelay]:
    relay = TcpRelay()
    relay.restore()
    yield relay
    relay.cut()


def _pg_rows(postgres_url: str) -> dict[str, Any]:
    """What the database holds, read with plain SQL on a direct connection."""
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        messages = {
            (cid, idx): (conv, incomplete)
            for cid, idx, conv, incomplete in conn.execute(
                "SELECT completion_id, choice_index, conversation_id, incomplete FROM messages"
                " WHERE completion_id IS NOT NULL"
            )
        }
        votes = {
            (cid, idx, uid): rating
            for cid, idx, uid, rating in conn.execute(
                "SELECT m.completion_id, m.choice_index, f.user_id, f.rating"
                " FROM feedback f JOIN messages m ON m.id = f.message_id"
            )
        }
        rankings = {
            (cid, uid): ids
            for cid, uid, ids in conn.execute(
                "SELECT completion_id, user_id, ranking FROM rankings"
            )
        }
        order = dict(conn.execute("SELECT id, choice_index FROM messages"))
    rankings = {k: [order[i] for i in v] for k, v in rankings.items()}
    return {"messages": messages, "votes": votes, "rankings": rankings}


def _spool_lines(data_dir: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in (data_dir / "spool").glob("segment-*.jsonl"))


def _count_lost(report: Any, n: int) -> None:
    """Add to the section's ``items_lost`` (acknowledged writes missing after recovery)."""
    report.record("faults", items_lost=report.sections.get("faults", {}).get("items_lost", 0) + n)


def _outage_settings(tmp_path: Path, url: str) -> Settings:
    return live_settings(tmp_path, url, policy_poll_seconds=0.5)


class Ledger:
    """Every write the API acknowledged (2xx), to check against the database afterwards."""

    def __init__(self, user_id: int) -> None:
        self.user_id = user_id
        self.completions: dict[str, str | None] = {}  # completion id -> conversation id
        self.votes: dict[tuple[str, int, int], int] = {}  # the last accepted vote wins
        self.rankings: dict[tuple[str, int], list[int]] = {}
        self.accepted_feedback = 0
        self.queued = 0

    def chat(self, r: httpx.Response) -> str:
        assert r.status_code == 200, r.text
        body = r.json()
        self.completions[body["id"]] = body["conversation_id"]
        return body["id"]

    def thumb(self, r: httpx.Response, cid: str, index: int, rating: int) -> None:
        assert r.status_code in (200, 202), r.text
        assert (r.status_code == 202) == bool(r.json().get("queued"))
        self.votes[(cid, index, self.user_id)] = rating
        self.accepted_feedback += 1
        self.queued += r.status_code == 202

    def rank(self, r: httpx.Response, cid: str, ranking: list[int]) -> None:
        assert r.status_code in (200, 202), r.text
        self.rankings[(cid, self.user_id)] = ranking
        self.accepted_feedback += 1
        self.queued += r.status_code == 202

    def lost(self, rows: dict[str, Any]) -> list[str]:
        """Acknowledged writes missing from (or different in) the database."""
        lost = []
        for cid, conv in self.completions.items():
            stored = rows["messages"].get((cid, 0))
            if stored is None or (conv is not None and stored[0] != conv):
                lost.append(f"completion {cid}: {stored}")
        for key, rating in self.votes.items():
            if rows["votes"].get(key) != rating:
                lost.append(f"vote {key}={rating}: {rows['votes'].get(key)}")
        for key, ranking in self.rankings.items():
            if rows["rankings"].get(key) != ranking:
                lost.append(f"ranking {key}={ranking}: {rows['rankings'].get(key)}")
        return lost


async def _ws_thumb(url: str, key: str, cid: str, index: int, rating: int) -> dict[str, Any]:
    ws_url = url.replace("http", "ws") + f"/v1/chat/ws?api_key={key}"
    async with websockets.connect(ws_url) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.send(
            json.dumps(
                {"type": "feedback", "completion_id": cid, "choice_index": index, "rating": rating}
            )
        )
        async with asyncio.timeout(30):
            return json.loads(await ws.recv())


# --------------------------------------------------------------------------- DB outage


@pytest.mark.postgres
def test_db_outage_chat_keeps_streaming_and_no_accepted_feedback_is_lost(
    tmp_path: Path, tiny_seed_dir: Path, postgres_url: str, relay: TcpRelay, reliability_report
) -> None:
    app = create_app(_outage_settings(tmp_path, relay.url(postgres_url)), seed_dir=tiny_seed_dir)
    state = app.state.palmchat
    with LiveServer(app) as live:
        key = create_key(state.db, "alice")
        api = Api(live.url, key)
        ledger = Ledger(_pg_user(postgres_url, "alice"))
        # before: two answers to rank later, a vote that the outage will change
        first = api.chat("What is 2 + 2?", n=2)
        before = ledger.chat(first)
        ledger.thumb(api.thumb(before, 0, -1), before, 0, -1)
        assert ledger.queued == 0

        relay.cut()  # ---------------------------------------------------------- outage
        cut_at = time.monotonic()
        assert is_openai_error(api.http.get("/v1/conversations"), 503)  # reads fail clearly
        stranger = Api(live.url, "pc-" + "x" * 40)
        r = stranger.chat("hello")
        assert is_openai_error(r, 503) and r.headers.get("retry-after")
        assert _not_ready(api)

        outage: list[str] = []
        for i in range(6):  # chat keeps answering, non-streaming and streaming
            r = api.chat(f"What is {i} + 1?", n=2, temperature=1.0)
            assert r.json()["conversation_id"] and r.json()["system_fingerprint"] == "v1"
            outage.append(ledger.chat(r))
        status, streamed, text, done = api.stream("Say hi.")
        assert status == 200 and done and streamed and isinstance(text, str)
        ledger.completions[streamed] = None
        # a continuation of a conversation started before the outage: the whole history is
        # answered and logged under it; only the new message cannot be answered from the
        # conversation's earlier turns while the log is away, which is a clear 503
        conv = ledger.completions[before]
        r = api.chat("And 3 + 3?", conversation_id=conv)
        assert is_openai_error(r, 503) and r.headers.get("retry-after")
        assert r.json()["error"]["code"] == "conversation_log_unavailable"
        history = [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
            {"role": "user", "content": "And 3 + 3?"},
        ]
        r = api.chat("", messages=history, conversation_id=conv)
        assert r.json()["conversation_id"] == conv
        ledger.chat(r)

        # thumbs and rankings: changed votes keep their order, many at once, over WebSocket
        ledger.thumb(api.thumb(before, 0, 1), before, 0, 1)  # -1 before, +1 now
        ledger.thumb(api.thumb(outage[0], 0, 1), outage[0], 0, 1)
        ledger.thumb(api.thumb(outage[0], 0, -1), outage[0], 0, -1)
        ledger.thumb(api.thumb(streamed, 0, 1), streamed, 0, 1)
        ledger.rank(api.rank(before, [1, 0]), before, [1, 0])
        ledger.rank(api.rank(outage[1], [0, 1]), outage[1], [0, 1])
        jobs = [
            (cid, i, 1 if (n + i) % 2 else -1) for n, cid in enumerate(outage[2:]) for i in (0, 1)
        ]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda j: api.thumb(*j), jobs))
        for (cid, i, rating), r in zip(jobs, results, strict=True):
            ledger.thumb(r, cid, i, rating)
        frame = asyncio.run(_ws_thumb(live.url, key, before, 1, -1))
        assert frame["type"] == "feedback" and frame["ok"] and frame["queued"], frame
        ledger.votes[(before, 1, ledger.user_id)] = -1
        ledger.accepted_feedback += 1
        ledger.queued += 1
        assert ledger.queued == ledger.accepted_feedback - 1  # everything after the cut queued

        # keep chatting and voting for the rest of the outage (the replay keeps retrying)
        while time.monotonic() - cut_at < OUTAGE_S:
            cid = ledger.chat(api.chat("What is 7 + 7?"))
            outage.append(cid)
            ledger.thumb(api.thumb(cid, 0, 1), cid, 0, 1)
        assert state.spool.unavailable and state.spool.replayed == 0

        # acknowledged means on disk: one spool line per queued write and per logged chat
        n_chats = len(outage) + 2
        assert _spool_lines(tmp_path) == ledger.queued + n_chats
        assert state.spool.backlog == ledger.queued + n_chats
        # nothing reached the database meanwhile
        assert ledger.lost(_pg_rows(postgres_url))
        outage_seconds = time.monotonic() - cut_at

        relay.restore()  # ------------------------------------------------------ recovery
        back_at = time.monotonic()
        assert state.spool.wait_empty(60), f"{state.spool.backlog} writes still spooled"
        replay_seconds = time.monotonic() - back_at
        lost = ledger.lost(_pg_rows(postgres_url))
        reliability_report.record(
            "faults",
            db_outage_seconds=round(outage_seconds, 2),
            db_outage_chats_answered=n_chats,
            db_outage_feedback_accepted=ledger.queued,
            db_outage_replay_seconds=round(replay_seconds, 2),
            db_outage_items_lost=len(lost),
        )
        _count_lost(reliability_report, len(lost))
        assert lost == [], lost
        assert not (tmp_path / "spool" / "rejected.jsonl").exists()
        assert list((tmp_path / "spool").glob("segment-*")) == []  # replayed segments go

        # back to direct writes; the API sees everything
        after = ledger.chat(api.chat("What is 9 + 1?"))
        r = api.thumb(after, 0, 1)
        assert r.status_code == 200 and "queued" not in r.json()
        listed = api.http.get("/v1/conversations", params={"limit": 500}).json()["data"]
        listed = {c["id"] for c in listed}
        assert {c for c in ledger.completions.values() if c} <= listed
        thread = api.http.get(f"/v1/conversations/{conv}").json()
        assert any(m["content"] == "And 3 + 3?" for m in thread["messages"])
        ratings = {(m["completion_id"], m["choice_index"]): m["rating"] for m in thread["messages"]}
        assert (ratings[(before, 0)], ratings[(before, 1)]) == (1, -1)


def _not_ready(api: Api) -> bool:
    r = api.http.get("/readyz")
    return is_openai_error(r, 503) and "database" in r.json()["error"]["message"]


def _pg_user(postgres_url: str, name: str) -> int:
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        return conn.execute("SELECT id FROM users WHERE name = %s", (name,)).fetchone()[0]


@pytest.mark.postgres
def test_a_server_killed_during_an_outage_loses_nothing_it_acknowledged(
    tmp_path: Path, tiny_seed_dir: Path, postgres_url: str, relay: TcpRelay, reliability_report
) -> None:
    settings = _outage_settings(tmp_path, relay.url(postgres_url))
    prepared = prepare(settings, seed_dir=tiny_seed_dir)
    key = create_key(prepared.engine, "bob")
    prepared.engine.dispose()
    port = free_port()
    env = {
        **os.environ,
        "PALMCHAT_DATA_DIR": str(tmp_path),
        "PALMCHAT_DATABASE_URL": settings.database_url,
        "PALMCHAT_PORT": str(port),
        "PALMCHAT_KV_CACHE_MEMORY_MB": "16",
        "PALMCHAT_RATE_LIMIT_PER_MINUTE": "0",
        "PALMCHAT_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "palmchat", "serve"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        api = Api(f"http://127.0.0.1:{port}", key)

        def up() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            try:
                return api.http.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, 90, "palmchat serve to start")
        ledger = Ledger(_pg_user(postgres_url, "bob"))
        first = ledger.chat(api.chat("What is 1 + 1?", n=2))  # the key is now known
        relay.cut()
        cids = [ledger.chat(api.chat(f"Spell 'cat{i}' backwards.", n=2)) for i in range(3)]
        for cid in [first, *cids]:
            ledger.thumb(api.thumb(cid, 1, 1), cid, 1, 1)
        ledger.rank(api.rank(cids[0], [1, 0]), cids[0], [1, 0])
        assert ledger.queued == 5
        proc.send_signal(signal.SIGKILL)  # no shutdown, no final replay
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    relay.restore()
    spooled = _spool_lines(tmp_path)
    assert spooled == ledger.queued + len(cids)
    assert len(ledger.lost(_pg_rows(postgres_url))) == ledger.queued + len(cids)

    # a new server on the same data dir takes the dead one's spool over and replays it
    app = create_app(_outage_settings(tmp_path, postgres_url), seed_dir=tiny_seed_dir)
    with LiveServer(app) as live:
        spool = app.state.palmchat.spool
        assert spool.wait_empty(60), f"{spool.backlog} writes still spooled"
        lost = ledger.lost(_pg_rows(postgres_url))
        reliability_report.record(
            "faults",
            killed_server_spooled_writes=spooled,
            killed_server_writes_replayed_on_restart=spool.replayed,
            killed_server_items_lost=len(lost),
        )
        _count_lost(reliability_report, len(lost))
        assert lost == [], lost
        assert spool.replayed == spooled and spool.rejected == 0
        thread = Api(live.url, key).http.get(f"/v1/conversations/{ledger.completions[cids[0]]}")
        assert thread.status_code == 200
        assert [m["rating"] for m in thread.json()["messages"] if m["role"] == "assistant"] == [
            None,
            1,
        ]
    assert list((tmp_path / "spool").glob("segment-*")) == []
