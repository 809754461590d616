"""Auth on a live server (real uvicorn, real engine, SQLite and PostgreSQL).

Every route of the app is classified (public, any user, per-user data, admin); a route added
without a class fails :func:`test_every_route_is_classified`. Then, against each class:

* no key, a wrong, near-miss or revoked key: 401 in OpenAI's shape, nothing changes;
* admin routes answer 403 to non-admins, and do work for an admin;
* a revoked key stops at the next request, and on an open WebSocket at its next frame;
* keys are stored only as SHA-256 (no row, no file under the data dir holds a raw key), the
  database is queried by that hash (never by the key, so no key-prefix timing), and no log
  line of the server (uvicorn's access and WebSocket lines included) holds a raw key.

Per-user data isolation is in :mod:`tests.reliability.test_isolation_users`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import MetaData, event, select
from sqlmodel import Session
from websockets.sync.client import connect as ws_connect

from shared.keys import resolve_key, revoke_key
from shared.schema import ApiKey
from tests.reliability._world import (
    ADMIN,
    PUBLIC,
    ROUTES,
    World,
    app_routes,
    bob_state,
    chat,
    error,
    request_route,
    section,
    ws_frames_until,
    ws_refused,
)


def test_every_route_is_classified(world: World) -> None:
    routes = app_routes(world.app)
    unclassified = routes - set(ROUTES)
    gone = set(ROUTES) - routes
    assert not unclassified, f"classify these new routes in ROUTES (and probe them): {unclassified}"
    assert not gone, f"these classified routes no longer exist: {gone}"


def _bad_keys(w: World) -> dict[str, dict[str, str]]:
    bob = w.keys["bob"]
    flipped = bob[:-1] + ("A" if bob[-1] != "A" else "B")
    return {
        "none": {},
        "garbage": {"Authorization": "Bearer pc-" + "x" * 40},
        "near miss (last char)": {"Authorization": f"Bearer {flipped}"},
        "key + extra char": {"Authorization": f"Bearer {bob}x"},
        "prefix only": {"Authorization": f"Bearer {bob[:8]}"},
        "upper-cased": {"Authorization": f"Bearer {bob.upper()}"},
        "wrong scheme": {"Authorization": f"Basic {bob}"},
        "bearer without a key": {"Authorization": "Bearer"},
        "huge": {"Authorization": "Bearer " + "k" * 8000},
        "revoked": {"Authorization": f"Bearer {w.keys['revoked']}"},
    }


def test_routes_need_a_valid_key(world: World, reliability_report) -> None:
    """401 (OpenAI's shape) on every non-public route for every kind of bad key, nothing
    changes; public routes answer without a key."""
    if "revoked" not in world.keys:
        world.key("revoked")
        assert revoke_key(world.db, world.keys["revoked"][:8]) == 1
    before = bob_state(world)
    problems, checked = [], 0
    for route, kind in sorted(ROUTES.items()):
        if route[0] == "WS":
            continue
        if kind == PUBLIC:
            r = request_route(world, route, {})
            if r.status_code != 200:
                problems.append(f"{route} without a key: {r.status_code}")
            checked += 1
            continue
        for name, headers in _bad_keys(world).items():
            r = request_route(world, route, headers)
            if r.status_code != 401 or error(r)["type"] != "authentication_error":
                problems.append(f"{route} with key {name}: {r.status_code} {r.text[:200]}")
        checked += 1
    bob = world.keys["bob"]
    for name, kwargs in {
        "no key (auth frame without one)": {"frame_key": None},
        "garbage": {"query_key": "pc-" + "x" * 40},
        "near miss": {"query_key": bob[:-1] + ("A" if bob[-1] != "A" else "B")},
        "auth frame, wrong type": {"frame_key": {"key": bob}},
        "revoked": {"query_key": world.keys["revoked"]},
    }.items():
        if not ws_refused(world, **kwargs):
            problems.append(f"WebSocket with {name} was not refused with 4401")
    checked += 1
    assert bob_state(world) == before
    reliability_report.record(section(world), auth_routes_checked=checked)
    assert not problems, "\n".join(problems)


def test_admin_routes_refuse_non_admins(world: World) -> None:
    """403 (permission_error) for a plain key on every admin route; the same requests work
    with an admin key, so the 403 is the role check, not a broken route."""
    admin_routes = [r for r, kind in ROUTES.items() if kind == ADMIN]
    active = _active_version(world)
    for route in admin_routes:
        r = request_route(world, route, {"Authorization": f"Bearer {world.keys['alice']}"})
        assert r.status_code == 403, (route, r.text)
        assert error(r)["type"] == "permission_error"
    assert _active_version(world) == active
    root = {"Authorization": f"Bearer {world.keys['root']}"}
    export = httpx.get(f"{world.url}/v1/feedback/export?format=kto", headers=root, timeout=60)
    assert export.status_code == 200 and world.canary in export.text  # bob's rated answer
    activate = request_route(world, ("POST", "/v1/policies/{version}/activate"), root)
    assert activate.status_code == 200 and activate.json()["active"] == "v1"
    rollback = request_route(world, ("POST", "/v1/policies/rollback"), root)
    assert rollback.status_code == 404  # reached the handler: there is no earlier version


def _active_version(w: World) -> str:
    r = httpx.get(
        f"{w.url}/v1/policies", headers={"Authorization": f"Bearer {w.keys['alice']}"}, timeout=30
    )
    return next(p["version"] for p in r.json()["data"] if p["status"] == "active")


def test_revoked_key_stops_at_once(world: World, reliability_report) -> None:
    """Revoking (what ``palmchat keys revoke`` does) takes effect on the very next request on
    every authenticated route, on new WebSockets, and at the next frame of an open one."""
    w = world
    key = w.key("carol")
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{w.url}/v1/models", headers=headers).status_code == 200
    with ws_connect(f"{w.ws_url}?api_key={key}", open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        ws.send(
            json.dumps(
                {"type": "chat", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
            )
        )
        assert ws_frames_until(ws, lambda f: f["type"] in ("done", "error"))[-1]["type"] == "done"

        assert revoke_key(w.db, key[:8]) == 1

        accepted = [
            (route, r.status_code)
            for route, kind in ROUTES.items()
            if kind != PUBLIC and route[0] != "WS"
            for r in [request_route(w, route, headers)]
            if r.status_code != 401
        ]
        reliability_report.record(section(w), revoked_key_accepted=len(accepted))
        assert not accepted, accepted
        ws.send(
            json.dumps(
                {"type": "chat", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
            )
        )
        frame = json.loads(ws.recv(timeout=30))
        assert frame["type"] == "error" and frame["error"]["type"] == "authentication_error"
        with pytest.raises(Exception) as closed:
            ws.recv(timeout=30)
        assert getattr(getattr(closed.value, "rcvd", None), "code", None) == 4401
    assert ws_refused(w, query_key=key) and ws_refused(w, frame_key=key)
    # only that key: the others still work
    for name in ("alice", "bob", "root"):
        r = httpx.get(f"{w.url}/v1/models", headers={"Authorization": f"Bearer {w.keys[name]}"})
        assert r.status_code == 200, name


def _all_rows(w: World) -> Iterator[tuple[str, dict[str, Any]]]:
    meta = MetaData()
    meta.reflect(bind=w.db)
    with w.db.connect() as conn:
        for table in meta.sorted_tables:
            for row in conn.execute(table.select()).mappings():
                yield table.name, dict(row)


def test_keys_are_stored_only_as_hashes(world: World, reliability_report) -> None:
    """No database cell and no file under the data dir (SQLite file, WAL, write spool,
    registry) holds a raw key; ``api_keys`` has each key's SHA-256 and 8-character prefix."""
    w = world
    w.key("hash-check")  # one more, just made
    secrets = {name: (k, k[8:]) for name, k in w.keys.items()}  # the part past the prefix
    with Session(w.db) as s:
        stored = {row.key_hash: row for row in s.execute(select(ApiKey)).scalars()}
    for name, (k, _) in secrets.items():
        digest = hashlib.sha256(k.encode()).hexdigest()
        assert digest in stored, name
        assert stored[digest].prefix == k[:8]
    hits = []
    for table, row in _all_rows(w):
        for column, value in row.items():
            text = json.dumps(value, default=str) if not isinstance(value, str) else value
            hits += [f"{table}.{column} ({n})" for n, (_, tail) in secrets.items() if tail in text]
    data_dir = w.app.state.palmchat.settings.data_dir
    for path in Path(data_dir).rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            hits += [f"{path} ({n})" for n, (_, tail) in secrets.items() if tail.encode() in blob]
    reliability_report.record(section(w), raw_keys_stored=len(hits), keys_checked=len(secrets))
    assert not hits, f"raw keys stored: {hits}"
    assert resolve_key(w.db, w.keys["hash-check"]) is not None  # the check itself is sound


@contextmanager
def _sql_log(engine) -> Iterator[list[str]]:
    statements: list[str] = []

    def capture(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append(f"{statement} {parameters!r}")

    event.listen(engine, "before_cursor_execute", capture)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", capture)


def test_keys_are_looked_up_by_hash_never_by_value(world: World) -> None:
    """The database sees only the SHA-256 of a presented key, for right and wrong keys alike:
    comparisons happen between digests, so timing cannot reveal how much of a guessed key's
    prefix was right (and ``resolve_key`` re-checks the digest with ``hmac.compare_digest``)."""
    w = world
    bob = w.keys["bob"]
    presented = {
        "valid": bob,
        "near miss": bob[:-1] + ("A" if bob[-1] != "A" else "B"),
        "same prefix": bob[:20] + "z" * (len(bob) - 20),
    }
    with _sql_log(w.db) as statements:
        codes = {
            name: httpx.get(
                f"{w.url}/v1/models", headers={"Authorization": f"Bearer {k}"}
            ).status_code
            for name, k in presented.items()
        }
    assert codes == {"valid": 200, "near miss": 401, "same prefix": 401}
    sql = "\n".join(statements)
    for name, k in presented.items():
        assert k[8:] not in sql, f"the {name} key reached the database as itself"
        assert hashlib.sha256(k.encode()).hexdigest() in sql, f"the {name} key's hash was not used"


CLIENT_LOGGERS = ("httpx", "httpcore", "websockets.client", "hpack")


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self._guard = threading.Lock()
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(CLIENT_LOGGERS):  # this test's own clients, same process
            return
        with self._guard:
            self.lines.append(self.format(record))  # message, args, exception and stack


@contextmanager
def _server_logs(level: int = logging.INFO) -> Iterator[_Capture]:
    """Everything the server logs at ``level`` (production's INFO by default) from the app,
    uvicorn's access log and its WebSocket lines, with levels raised for the duration."""
    names = ("", "uvicorn", "uvicorn.access", "uvicorn.error", "server", "shared")
    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.level for lg in loggers]
    capture = _Capture()
    for lg in loggers:
        lg.setLevel(level)
    for name in ("", "uvicorn", "uvicorn.access"):  # the last two do not propagate to root
        logging.getLogger(name).addHandler(capture)
    try:
        yield capture
    finally:
        for name in ("", "uvicorn", "uvicorn.access"):
            logging.getLogger(name).removeHandler(capture)
        for lg, lvl in zip(loggers, saved, strict=True):
            lg.setLevel(lvl)


def test_no_key_appears_in_the_server_logs(world: World, reliability_report) -> None:
    """Valid, wrong and revoked keys in the header, in ``?api_key=`` (REST and WebSocket) and
    in the WebSocket's auth frame, with errors along the way: no log line holds any of them."""
    w = world
    good, other = w.key("logger"), w.key("logger-2")
    revoked = w.key("logger-revoked")
    revoke_key(w.db, revoked[:8])
    wrong = "pc-" + uuid.uuid4().hex + "wrongwrong"
    keys = {"good": good, "other": other, "revoked": revoked, "wrong": wrong}
    with _server_logs() as logs:
        for k in keys.values():
            httpx.get(f"{w.url}/v1/models", headers={"Authorization": f"Bearer {k}"})
            httpx.get(f"{w.url}/v1/models?api_key={k}")  # not a REST way to send a key: 401
            httpx.post(
                f"{w.url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {k}"},
                json={"model": "palmchat", "messages": [], "max_tokens": 1},
            )
        chat(w.client(good), "logged chat")
        with ws_connect(f"{w.ws_url}?api_key={good}", open_timeout=30) as ws:
            ws.recv(timeout=30)
            ws.send(
                json.dumps(
                    {
                        "type": "chat",
                        "max_tokens": 2,
                        "messages": [{"role": "user", "content": "x"}],
                    }
                )
            )
            ws_frames_until(ws, lambda f: f["type"] in ("done", "error"))
            ws.send("{not json")
            ws.recv(timeout=30)
        with ws_connect(w.ws_url, additional_headers={"Authorization": f"Bearer {other}"}) as ws:
            ws.recv(timeout=30)
        with ws_connect(w.ws_url, open_timeout=30) as ws:
            ws.send(json.dumps({"type": "auth", "api_key": other}))
            ws.recv(timeout=30)
        for k in (wrong, revoked):
            assert ws_refused(w, query_key=k) and ws_refused(w, frame_key=k)
    text = "\n".join(logs.lines)
    # the capture works: uvicorn's access and WebSocket lines are in it
    assert '"GET /v1/models' in text and '"WebSocket /v1/chat/ws' in text, text[-2000:]
    found = [name for name, k in keys.items() if k[8:] in text]
    reliability_report.record(
        section(w), keys_in_logs=len(found), log_lines_checked=len(logs.lines)
    )
    assert not found, f"keys in the server log: {found}"
