"""Faults: the database going away, corrupt checkpoints, a trainer killed at random points, a
server restarted or killed. Real processes, the real PostgreSQL at 127.0.0.1:5432, real files;
nothing of palmchat is mocked. Figures go to the ``faults`` section of the reliability report.

* DB outage: a server on PostgreSQL reaches it through a TCP relay that the test cuts (every
  connection reset, new ones refused) and restores. Chat keeps streaming; thumbs and rankings
  are answered 202 once fsynced into the spool; every write answered 2xx is in the database
  after recovery, with the last vote winning.
* A server SIGKILLed during an outage: a new server on the same data dir replays its spool.
* Corrupt or truncated policy versions: the activation API refuses them (409) and the policy
  watcher refuses one the database says is active; the current policy keeps serving.
* A trainer SIGKILLed at random points of several rounds: the registry only holds whole
  versions, no run stays ``running``, and a last uninterrupted round counts every feedback
  item exactly once.
* A server restart: conversations, ratings and rankings are all there, unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from sqlmodel import select

from server.api.app import create_app
from shared.bootstrap import prepare
from shared.checkpoints import PolicyRegistry
from shared.config import Settings
from shared.db import session
from shared.keys import create_key
from shared.policies import active_version, register_version
from shared.schema import Policy, TrainingRun, User, utcnow
from tests.conftest import LiveServer
from tests.trainer.trainer_helpers import DataDir, add_feedback
from trainer.config import TrainerConfig
from trainer.feedback import load_watermark, pending
from trainer.loop import OnlineTrainer, TrainerContext
from trainer.reward import RewardRegistry

REPO = Path(__file__).resolve().parents[2]
PG = ("127.0.0.1", 5432)
OUTAGE_S = 4.0  # how long the database stays away in the outage test


# --------------------------------------------------------------------------- helpers


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


class Api:
    """A caller of the chat API with one key."""

    def __init__(self, url: str, key: str) -> None:
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )
        self.key = key

    def chat(self, content: str, **extra: Any) -> httpx.Response:
        body = {
            "model": "palmchat",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 8,
            **extra,
        }
        return self.http.post("/v1/chat/completions", json=body)

    def stream(self, content: str) -> tuple[int, str | None, str, bool]:
        """(status, completion id, text, saw [DONE]) of an SSE chat."""
        body = {
            "model": "palmchat",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 8,
            "stream": True,
        }
        cid, text, done = None, "", False
        with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                cid = chunk["id"]
                for choice in chunk["choices"]:
                    text += choice["delta"].get("content") or ""
            return r.status_code, cid, text, done

    def thumb(self, cid: str, index: int, rating: int) -> httpx.Response:
        return self.http.post(
            "/v1/feedback", json={"completion_id": cid, "choice_index": index, "rating": rating}
        )

    def rank(self, cid: str, ranking: list[int]) -> httpx.Response:
        return self.http.post("/v1/rankings", json={"completion_id": cid, "ranking": ranking})


def _is_openai_error(r: httpx.Response, status: int) -> bool:
    body = r.json()
    return (
        r.status_code == status
        and set(body) == {"error"}
        and set(body["error"]) == {"message", "type", "param", "code"}
    )


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


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _outage_settings(tmp_path: Path, url: str) -> Settings:
    return Settings(
        data_dir=tmp_path,
        database_url=url,
        kv_cache_memory_mb=16,
        rate_limit_per_minute=0,
        policy_poll_seconds=0.5,
    )


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
        before = ledger.chat(api.chat("What is 2 + 2?", n=2))
        ledger.thumb(api.thumb(before, 0, -1), before, 0, -1)
        assert ledger.queued == 0

        relay.cut()  # ---------------------------------------------------------- outage
        cut_at = time.monotonic()
        assert _is_openai_error(api.http.get("/v1/conversations"), 503)  # reads fail clearly
        stranger = Api(live.url, "pc-" + "x" * 40)
        r = stranger.chat("hello")
        assert _is_openai_error(r, 503) and r.headers.get("retry-after")
        assert _not_ready(api)

        outage: list[str] = []
        for i in range(6):  # chat keeps answering, non-streaming and streaming
            r = api.chat(f"What is {i} + 1?", n=2, temperature=1.0)
            assert r.json()["conversation_id"] and r.json()["system_fingerprint"] == "v1"
            outage.append(ledger.chat(r))
        status, streamed, text, done = api.stream("Say hi.")
        assert status == 200 and done and streamed and isinstance(text, str)
        ledger.completions[streamed] = None
        # a continuation of a conversation started before the outage
        conv = ledger.completions[before]
        r = api.chat("And 3 + 3?", conversation_id=conv)
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
    return _is_openai_error(r, 503) and "database" in r.json()["error"]["message"]


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
    port = _free_port()
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

        _wait(up, 90, "palmchat serve to start")
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


# --------------------------------------------------------------------------- checkpoints


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(version_dir: Path, edit: Callable[[dict], None]) -> None:
    path = version_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "weights_byte_flipped": lambda d: _flip_byte(d / "model.safetensors"),
    "weights_truncated": lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:-4096]
    ),
    "weights_missing": lambda d: (d / "model.safetensors").unlink(),
    "tokenizer_edited": lambda d: (d / "tokenizer.json").write_text(
        (d / "tokenizer.json").read_text().replace('"', "'", 1)
    ),
    "manifest_not_json": lambda d: (d / "manifest.json").write_text('{"format": '),
    "manifest_missing": lambda d: (d / "manifest.json").unlink(),
    "manifest_sha_wrong": lambda d: _edit_manifest(
        d, lambda m: m["files"]["model.safetensors"].update(sha256="0" * 64)
    ),
    "manifest_config_mismatch": lambda d: _edit_manifest(
        d, lambda m: m["config"].update(dim=m["config"]["dim"] * 2)
    ),
}


def test_corrupt_checkpoints_are_refused_and_the_current_policy_keeps_serving(
    tmp_path: Path, tiny_seed_dir: Path, reliability_report
) -> None:
    settings = Settings(
        data_dir=tmp_path, policy_poll_seconds=0.2, kv_cache_memory_mb=16, rate_limit_per_minute=0
    )
    app = create_app(settings, seed_dir=tiny_seed_dir)
    state = app.state.palmchat
    registry = state.registry
    with LiveServer(app) as live:
        admin = Api(live.url, create_key(state.db, "root", admin=True))

        def serving(expected: str) -> None:
            r = admin.chat("What is 2 + 2?")
            assert r.status_code == 200 and r.json()["system_fingerprint"] == expected, r.text

        refused = {}
        for name, corrupt in CORRUPTIONS.items():
            version = registry.install(registry.path("v1"), parent="v1")
            corrupt(registry.path(version))
            r = admin.http.post(f"/v1/policies/{version}/activate")
            assert _is_openai_error(r, 409), (name, r.status_code, r.text)
            assert r.json()["error"]["code"] == "policy_verification_failed"
            assert version in r.json()["error"]["message"]
            refused[name] = r.json()["error"]["message"]
            assert active_version(state.db) == "v1"
            serving("v1")

        # damaged after another process activated it: the table says serve it, the watcher
        # refuses and the current policy keeps answering
        version = registry.install(registry.path("v1"), parent="v1")
        register_version(state.db, registry, version)
        _flip_byte(registry.path(version) / "model.safetensors")
        with session(state.db) as s:
            for row in s.exec(select(Policy).where(Policy.status == "active")):
                row.status = "retired"
                s.add(row)
            target = s.get(Policy, version)
            target.status, target.activated_at = "active", utcnow()
            s.add(target)
        assert active_version(state.db) == version
        swaps = _swaps(admin)
        deadline = time.monotonic() + 10 * settings.policy_poll_seconds
        answered = 0
        while time.monotonic() < deadline:
            serving("v1")
            answered += 1
        assert state.extras["engine"].version == "v1" and _swaps(admin) == swaps

        # a sound version is still taken up, so the refusals above were the checks' doing
        good = registry.install(registry.path("v1"), parent="v1")
        r = admin.http.post(f"/v1/policies/{good}/activate")
        assert r.status_code == 200, r.text
        _wait(lambda: admin.chat("hi").json()["system_fingerprint"] == good, 30, "hot-swap")
        assert _swaps(admin) == swaps + 1

    reliability_report.record(
        "faults",
        corrupt_checkpoints_refused=len(refused) + 1,
        corrupt_checkpoint_kinds=sorted([*refused, "watcher_refused_damaged_active_version"]),
        chats_served_while_a_corrupt_version_was_active=answered,
    )


def _swaps(api: Api) -> float:
    text = api.http.get("/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("palmchat_policy_swaps_total"))
    return float(line.split()[-1])


# --------------------------------------------------------------------------- trainer kills

TRAINER_KILLS = 4
# where a kill is aimed: this long (at most, uniformly) after the event is seen
KILL_AFTER_S = {"round_started": 5.0, "reward_model_saved": 1.5, "candidate_publishing": 0.3}
TRAINER_SETS = {
    "settle_seconds": 0,
    "rm_max_steps": 2,
    "pref_max_steps": 2,
    "gate_prompts": 4,
    "gate_max_new_tokens": 8,
    "threads": 1,
    "gate_min_reward_gain": -1e9,
}


def _trainer(dd: DataDir, log: Path) -> subprocess.Popen:
    sets = [arg for k, v in TRAINER_SETS.items() for arg in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "palmchat", "trainer", "--data-dir", str(dd.root),
           "--metrics-port", "0", "--once", *sets]  # fmt: skip
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)


def _runs(dd: DataDir) -> list[TrainingRun]:
    with session(dd.ctx.engine) as s:
        return list(s.exec(select(TrainingRun).order_by(TrainingRun.id)).all())


def _assert_consistent(dd: DataDir) -> None:
    """Every visible policy and reward model version is whole; the active one loads."""
    registry = dd.ctx.registry
    for version in registry.versions():
        registry.verify(version)
    rewards = RewardRegistry(dd.ctx.reward_root)
    for version in rewards.versions():
        rewards.load(version)
    with session(dd.ctx.engine) as s:
        active = s.exec(select(Policy).where(Policy.status == "active")).all()
    assert len(active) == 1
    registry.load(active[0].version)


def _temp_dirs(dd: DataDir) -> set[str]:
    return {p.name for p in dd.ctx.registry.root.glob(".tmp-*")}


def _phase(dd: DataDir, run: TrainingRun | None, temp_dirs: set[str]) -> str:
    """Where a killed round was, judged from what it left behind (``temp_dirs``: the
    registry's half-written directories from before the round)."""
    if run is None:
        return "before_round"
    if run.status != "running":
        return f"finished_{run.status}"
    if run.candidate_version:
        return "published_not_activated"
    if _temp_dirs(dd) - temp_dirs:
        return "publishing"
    return "training"


def test_trainer_killed_at_random_points_resumes_from_its_watermark(
    tmp_path: Path, tiny_seed_dir: Path, reliability_report
) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    PolicyRegistry(settings.registry_dir).install(tiny_seed_dir)
    ctx = TrainerContext.from_settings(settings)
    with session(ctx.engine) as s:
        user = User(name="sim")
        s.add(user)
        s.flush()
        dd = DataDir(settings, ctx, user.id)
    total = 0

    def more_feedback(n_prompts: int, seed: int) -> None:
        nonlocal total
        before = pending(ctx.engine, load_watermark(ctx.engine)).total
        add_feedback(dd, n_prompts=n_prompts, seed=seed)
        total += pending(ctx.engine, load_watermark(ctx.engine)).total - before

    more_feedback(5, seed=0)
    seed = int(os.environ.get("PALMCHAT_FAULTS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    phases = []
    rewards = RewardRegistry(ctx.reward_root)
    log = tmp_path / "trainer.log"
    # every kind of aim once, plus one more at random; the delays are random too
    aims = [*KILL_AFTER_S, rng.choice(list(KILL_AFTER_S))][:TRAINER_KILLS]
    rng.shuffle(aims)
    for i, aim in enumerate(aims):
        known = (len(_runs(dd)), len(rewards.versions()), len(dd.ctx.registry.versions()))
        temp_dirs = _temp_dirs(dd)
        events = {
            "round_started": lambda k=known: len(_runs(dd)) > k[0],
            "reward_model_saved": lambda k=known: len(rewards.versions()) > k[1],
            "candidate_publishing": lambda k=known: (
                any(dd.ctx.registry.root.glob(".tmp-*")) or len(dd.ctx.registry.versions()) > k[2]
            ),
        }
        proc = _trainer(dd, log)
        try:
            _wait(lambda p=proc, e=events[aim]: e() or p.poll() is not None, 120, aim)
            try:
                proc.wait(timeout=rng.uniform(0.0, KILL_AFTER_S[aim]))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        runs = _runs(dd)
        if proc.returncode == -signal.SIGKILL:
            phases.append(_phase(dd, runs[-1] if len(runs) > known[0] else None, temp_dirs))
        else:
            assert proc.returncode == 0, log.read_text()[-3000:]
            phases.append("completed")
        if pending(ctx.engine, load_watermark(ctx.engine)).total == 0:
            more_feedback(2, seed=100 + i)  # a round finished: give the next one work
        # after every kill: nothing half-published is visible, the active version loads
        _assert_consistent(dd)
        assert sum(r.status == "running" for r in _runs(dd)) <= 1

    # the next start (in this process, uninterrupted) cleans up and finishes the work
    result = OnlineTrainer(ctx, TrainerConfig(**TRAINER_SETS)).run_round(force=True)
    assert result.status == "published", result.reasons
    runs = _runs(dd)
    _assert_consistent(dd)
    assert [r.status for r in runs if r.status == "running"] == []
    finished = [r for r in runs if r.status in ("published", "rejected")]
    killed = [r for r in runs if r.status == "failed"]
    assert len(killed) == sum(
        p in ("training", "publishing", "published_not_activated") for p in phases
    )
    # every feedback item was consumed by exactly one finished round
    assert sum(r.n_feedback for r in finished) == total
    assert pending(ctx.engine, load_watermark(ctx.engine)).total == 0
    assert active_version(ctx.engine) == finished[-1].candidate_version
    with session(ctx.engine) as s:
        policies = {p.version: p for p in s.exec(select(Policy)).all()}
    for run in killed:  # a killed round's candidate is never left waiting or served
        if run.candidate_version:
            assert policies[run.candidate_version].status == "rejected"
    reliability_report.record(
        "faults",
        trainer_kills=sum(p != "completed" for p in phases),
        trainer_kill_aims=aims,
        trainer_kill_phases=phases,
        trainer_kill_seed=seed,
        trainer_rounds_failed_then_recovered=len(killed),
        trainer_feedback_items=total,
        trainer_feedback_counted_once=True,
    )


# --------------------------------------------------------------------------- restart


def test_server_restart_keeps_conversations_and_feedback(
    tmp_path: Path, tiny_seed_dir: Path, reliability_report
) -> None:
    settings = Settings(data_dir=tmp_path, kv_cache_memory_mb=16, rate_limit_per_minute=0)
    app = create_app(settings, seed_dir=tiny_seed_dir)
    with LiveServer(app) as live:
        key = create_key(app.state.palmchat.db, "carol")
        admin_key = create_key(app.state.palmchat.db, "root", admin=True)
        api, admin = Api(live.url, key), Api(live.url, admin_key)
        cids = []
        for i in range(4):
            r = api.chat(f"What is {i} + {i}?", n=2)
            assert r.status_code == 200
            cids.append(r.json()["id"])
            assert api.thumb(cids[-1], 0, 1 if i % 2 else -1).status_code == 200
        assert api.rank(cids[0], [1, 0]).status_code == 200
        conv = api.chat("And 5 + 5?", conversation_id=_conv(api, cids[0])).json()
        status, streamed, _, done = api.stream("Say hi.")
        assert status == 200 and done
        assert api.thumb(streamed, 0, 1).status_code == 200
        deleted = _conv(api, cids[3])
        assert api.http.delete(f"/v1/conversations/{deleted}").status_code in (200, 204)
        before = _snapshot(api, admin)
    assert len(before["conversations"]) == 4  # 4 chats + 1 stream, one deleted
    ratings = sum(1 for c in before["threads"].values() for m in c["messages"] if m["rating"])
    assert ratings == 4  # 5 votes, one in the deleted conversation
    assert len(before["kto"]) == 5 and before["preference"]  # deleted threads stay for training

    app = create_app(settings, seed_dir=tiny_seed_dir)
    with LiveServer(app) as live:
        api, admin = Api(live.url, key), Api(live.url, admin_key)
        after = _snapshot(api, admin)
        assert after == before
        # the restarted server continues a conversation of the first one
        r = api.chat("And 6 + 6?", conversation_id=conv["conversation_id"])
        assert r.status_code == 200 and r.json()["conversation_id"] == conv["conversation_id"]
        assert api.thumb(cids[1], 1, 1).status_code == 200
    reliability_report.record(
        "faults",
        restart_conversations_kept=len(after["conversations"]),
        restart_ratings_kept=len(after["kto"]),
        restart_rankings_kept=1,
    )


def _conv(api: Api, cid: str) -> str:
    for c in api.http.get("/v1/conversations").json()["data"]:
        thread = api.http.get(f"/v1/conversations/{c['id']}").json()
        if any(m["completion_id"] == cid for m in thread["messages"]):
            return c["id"]
    raise AssertionError(f"{cid} is in no conversation")


def _snapshot(api: Api, admin: Api) -> dict[str, Any]:
    """The user's conversations with their ratings, and the admin's training exports."""
    conversations = api.http.get("/v1/conversations").json()["data"]
    threads = {c["id"]: api.http.get(f"/v1/conversations/{c['id']}").json() for c in conversations}
    exports = {
        fmt: admin.http.get("/v1/feedback/export", params={"format": fmt}).text.splitlines()
        for fmt in ("preference", "kto")
    }
    return {"conversations": conversations, "threads": threads, **exports}
