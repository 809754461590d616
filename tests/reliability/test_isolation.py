"""Isolation and auth on a live server (real uvicorn, real engine, SQLite and PostgreSQL).

Every route of the app is classified (public, any user, per-user data, admin); a route added
without a class fails :func:`test_every_route_is_classified`. Then, against each class:

* no key, a wrong, near-miss or revoked key: 401 in OpenAI's shape, nothing changes;
* user A cannot read, list, delete, continue, rate or rank user B's conversations and
  completions (REST and WebSocket), also with guessed ids; the answers are the same 404 as for
  ids that do not exist, and nothing A receives contains B's text (canaries);
* admin routes answer 403 to non-admins, and do work for an admin;
* a revoked key stops at the next request, and on an open WebSocket at its next frame;
* keys are stored only as SHA-256 (no row, no file under the data dir holds a raw key), the
  database is queried by that hash (never by the key, so no key-prefix timing), and no log
  line of the server (uvicorn's access and WebSocket lines included) holds a raw key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastapi.routing
import httpx
import pytest
from sqlalchemy import MetaData, event, select
from sqlmodel import Session
from websockets.sync.client import connect as ws_connect

from server.api.app import create_app
from shared.config import Settings
from shared.keys import create_key, resolve_key, revoke_key
from shared.schema import ApiKey, Feedback, Message, Ranking
from tests.conftest import LiveServer
from tests.reliability._databases import DATABASES, database_url

PUBLIC, USER, OWNED, ADMIN = "public", "user", "owned", "admin"

# Every route of the app and who may use it. A new route must be added here (and probed
# below): the test fails until it is.
ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("GET", "/docs/oauth2-redirect"): PUBLIC,
    ("GET", "/redoc"): PUBLIC,
    ("GET", "/"): PUBLIC,
    ("GET", "/admin"): PUBLIC,
    ("GET", "/static/{name:path}"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/v1/models"): USER,
    ("GET", "/v1/policies"): USER,
    ("POST", "/v1/chat/completions"): OWNED,  # conversation_id continues one's own thread
    ("GET", "/v1/conversations"): OWNED,
    ("GET", "/v1/conversations/{conversation_id}"): OWNED,
    ("DELETE", "/v1/conversations/{conversation_id}"): OWNED,
    ("POST", "/v1/feedback"): OWNED,
    ("POST", "/v1/rankings"): OWNED,
    ("WS", "/v1/chat/ws"): OWNED,
    ("GET", "/v1/feedback/export"): ADMIN,
    ("POST", "/v1/policies/{version}/activate"): ADMIN,
    ("POST", "/v1/policies/rollback"): ADMIN,
}


def app_routes(app: fastapi.FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every route, included routers flattened; WebSockets as ``WS``."""
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)  # FastAPI >= 0.16x
    out = set()
    for route in flatten(app.routes) if flatten else app.routes:
        methods = getattr(route, "methods", None)
        if methods:
            out |= {(m, route.path) for m in methods if m != "HEAD"}
        else:  # a WebSocket route (or a mount, which would need a class of its own)
            inner = getattr(route, "route", route)
            out.add(("WS" if "WebSocket" in type(inner).__name__ else "MOUNT", route.path))
    return out


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    """A live server with three users: alice and bob (plain), root (admin); bob's data."""

    live: LiveServer
    app: fastapi.FastAPI
    database: str
    keys: dict[str, str] = field(default_factory=dict)  # name -> raw key (every key made)
    canary: str = field(default_factory=lambda: f"canary-{uuid.uuid4().hex}")
    bob_conv: str = ""
    bob_cid: str = ""
    bob_ws_conv: str = ""
    bob_ws_cid: str = ""
    alice_conv: str = ""
    alice_cid: str = ""

    @property
    def url(self) -> str:
        return self.live.url

    @property
    def ws_url(self) -> str:
        return self.live.url.replace("http", "ws", 1) + "/v1/chat/ws"

    @property
    def db(self):
        return self.app.state.palmchat.db

    def key(self, name: str, *, admin: bool = False) -> str:
        self.keys[name] = create_key(self.db, f"{name}-{self.canary[-6:]}", admin=admin)
        return self.keys[name]

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def _chat(client: httpx.Client, text: str, **params: Any) -> dict[str, Any]:
    body = {"model": "palmchat", "messages": [{"role": "user", "content": text}], **params}
    r = client.post("/v1/chat/completions", json={"max_tokens": 4, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _ws_frames_until(ws, done: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    frames = []
    while True:
        frames.append(json.loads(ws.recv(timeout=60)))
        if done(frames[-1]):
            return frames


@pytest.fixture(scope="module", params=DATABASES)
def world(
    request, tmp_path_factory: pytest.TempPathFactory, tiny_seed_dir: Path
) -> Iterator[World]:
    with database_url(request.param) as url:
        settings = Settings(
            data_dir=tmp_path_factory.mktemp("isolation"),
            database_url=url,
            kv_cache_memory_mb=16,
            rate_limit_per_minute=0,
        )
        app = create_app(settings, seed_dir=tiny_seed_dir)
        with LiveServer(app) as live:
            w = World(live=live, app=app, database=request.param)
            for name in ("alice", "bob"):
                w.key(name)
            w.key("root", admin=True)
            # bob's data, made through the API like any user's
            with w.client(w.keys["bob"]) as bob:
                first = _chat(bob, f"secret question {w.canary}", n=2, temperature=1.0, seed=3)
                w.bob_conv, w.bob_cid = first["conversation_id"], first["id"]
                r = bob.post(
                    "/v1/feedback",
                    json={
                        "completion_id": w.bob_cid,
                        "choice_index": 0,
                        "rating": 1,
                        "reason": f"secret reason {w.canary}",
                    },
                )
                assert r.status_code == 200, r.text
                r = bob.post("/v1/rankings", json={"completion_id": w.bob_cid, "ranking": [1, 0]})
                assert r.status_code == 200, r.text
            with ws_connect(w.ws_url + f"?api_key={w.keys['bob']}", open_timeout=30) as ws:
                ws.recv(timeout=30)
                ws.send(
                    json.dumps(
                        {
                            "type": "chat",
                            "max_tokens": 4,
                            "messages": [{"role": "user", "content": f"ws secret {w.canary}"}],
                        }
                    )
                )
                done = _ws_frames_until(ws, lambda f: f["type"] in ("done", "error"))[-1]
                assert done["type"] == "done", done
                w.bob_ws_conv, w.bob_ws_cid = done["conversation_id"], done["completion_id"]
            with w.client(w.keys["alice"]) as alice:
                mine = _chat(alice, "alice's own question")
                w.alice_conv, w.alice_cid = mine["conversation_id"], mine["id"]
            yield w


def _bob_state(w: World) -> dict[str, Any]:
    """Everything of bob's that another user might change."""
    with Session(w.db) as s:
        messages = s.execute(
            select(Message.id, Message.conversation_id, Message.content).where(
                Message.conversation_id.in_([w.bob_conv, w.bob_ws_conv])
            )
        ).all()
        feedback = s.execute(select(Feedback.message_id, Feedback.user_id, Feedback.rating)).all()
        rankings = s.execute(select(Ranking.completion_id, Ranking.user_id, Ranking.ranking)).all()
    with w.client(w.keys["bob"]) as bob:
        threads = [bob.get(f"/v1/conversations/{c}").json() for c in (w.bob_conv, w.bob_ws_conv)]
        listed = sorted(c["id"] for c in bob.get("/v1/conversations").json()["data"])
    return {
        "messages": sorted(map(tuple, messages)),
        "feedback": sorted(map(tuple, feedback)),
        "rankings": sorted((c, u, tuple(r)) for c, u, r in rankings),
        "threads": threads,
        "listed": listed,
    }


def _error(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# --------------------------------------------------------------------------- probes


def _target(w: World, route: tuple[str, str]) -> tuple[str, str, Any]:
    """A concrete request for ``route`` that aims at bob's data where it takes an id."""
    method, path = route
    url = {
        "/v1/conversations/{conversation_id}": f"/v1/conversations/{w.bob_conv}",
        "/v1/policies/{version}/activate": "/v1/policies/v1/activate",
        "/static/{name:path}": "/static/chat.js",
    }.get(path, path)
    body = {
        ("POST", "/v1/chat/completions"): {
            "model": "palmchat",
            "max_tokens": 2,
            "conversation_id": w.bob_conv,
            "messages": [{"role": "user", "content": "and then?"}],
        },
        ("POST", "/v1/feedback"): {"completion_id": w.bob_cid, "choice_index": 0, "rating": -1},
        ("POST", "/v1/rankings"): {"completion_id": w.bob_cid, "ranking": [0, 1]},
    }.get(route)
    return method, url, body


def _http(w: World, route: tuple[str, str], headers: dict[str, str]) -> httpx.Response:
    method, url, body = _target(w, route)
    return httpx.request(method, w.url + url, json=body, headers=headers, timeout=60)


def _ws_refused(w: World, *, query_key: str | None = None, frame_key: Any = None) -> bool:
    """Whether a WebSocket with this key is refused: an authentication error frame, then close
    code 4401, before any ready frame."""
    url = w.ws_url + (f"?api_key={query_key}" if query_key is not None else "")
    with ws_connect(url, open_timeout=30) as ws:
        if query_key is None:
            ws.send(json.dumps({"type": "auth", "api_key": frame_key}))
        frame = json.loads(ws.recv(timeout=30))
        if frame["type"] != "error" or frame["error"]["type"] != "authentication_error":
            return False
        try:
            ws.recv(timeout=30)
        except Exception as e:  # ConnectionClosed
            return getattr(getattr(e, "rcvd", None), "code", None) == 4401
        return False


# --------------------------------------------------------------------------- tests


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
    before = _bob_state(world)
    problems, checked = [], 0
    for route, kind in sorted(ROUTES.items()):
        if route[0] == "WS":
            continue
        if kind == PUBLIC:
            r = _http(world, route, {})
            if r.status_code != 200:
                problems.append(f"{route} without a key: {r.status_code}")
            checked += 1
            continue
        for name, headers in _bad_keys(world).items():
            r = _http(world, route, headers)
            if r.status_code != 401 or _error(r)["type"] != "authentication_error":
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
        if not _ws_refused(world, **kwargs):
            problems.append(f"WebSocket with {name} was not refused with 4401")
    checked += 1
    assert _bob_state(world) == before
    reliability_report.record(_section(world), auth_routes_checked=checked)
    assert not problems, "\n".join(problems)


def test_admin_routes_refuse_non_admins(world: World) -> None:
    """403 (permission_error) for a plain key on every admin route; the same requests work
    with an admin key, so the 403 is the role check, not a broken route."""
    admin_routes = [r for r, kind in ROUTES.items() if kind == ADMIN]
    active = _active_version(world)
    for route in admin_routes:
        r = _http(world, route, {"Authorization": f"Bearer {world.keys['alice']}"})
        assert r.status_code == 403, (route, r.text)
        assert _error(r)["type"] == "permission_error"
    assert _active_version(world) == active
    root = {"Authorization": f"Bearer {world.keys['root']}"}
    export = httpx.get(f"{world.url}/v1/feedback/export?format=kto", headers=root, timeout=60)
    assert export.status_code == 200 and world.canary in export.text  # bob's rated answer
    activate = _http(world, ("POST", "/v1/policies/{version}/activate"), root)
    assert activate.status_code == 200 and activate.json()["active"] == "v1"
    rollback = _http(world, ("POST", "/v1/policies/rollback"), root)
    assert rollback.status_code == 404  # reached the handler: there is no earlier version


def _active_version(w: World) -> str:
    r = httpx.get(
        f"{w.url}/v1/policies", headers={"Authorization": f"Bearer {w.keys['alice']}"}, timeout=30
    )
    return next(p["version"] for p in r.json()["data"] if p["status"] == "active")


class LeakCheck:
    """Alice's view: every response she gets is kept and scanned for bob's canary."""

    def __init__(self, w: World) -> None:
        self.w = w
        self.problems: list[str] = []
        self.seen: list[str] = []
        self.routes: set[tuple[str, str]] = set()
        self.client = w.client(w.keys["alice"])

    def request(self, route: tuple[str, str], method: str, url: str, **kw: Any) -> httpx.Response:
        self.routes.add(route)
        r = self.client.request(method, url, **kw)
        self.seen.append(r.text)
        return r

    def expect_404(self, route: tuple[str, str], method: str, url: str, **kw: Any) -> None:
        r = self.request(route, method, url, **kw)
        if r.status_code != 404 or _error(r)["type"] != "not_found_error":
            self.problems.append(f"{method} {url} {kw.get('json')}: {r.status_code} {r.text[:300]}")

    def fail(self, what: str) -> None:
        self.problems.append(what)

    def leaks(self) -> list[str]:
        return [text[:300] for text in self.seen if self.w.canary in text]


def _guessed_ids(w: World) -> list[str]:
    """Ids alice might try for bob's things: his real ids leaked (uppercase, padded,
    truncated), sequential message ids, SQL wildcards and injections."""
    with Session(w.db) as s:
        message_ids = [str(i) for i in s.execute(select(Message.id)).scalars()]
    real = [w.bob_conv, w.bob_cid, w.bob_ws_conv, w.bob_ws_cid]
    return [
        *real,
        *(x.upper() for x in real),
        *(x + " " for x in real),
        *(x[:-1] for x in real),
        *message_ids,
        "%",
        "_",
        "*",
        "' OR '1'='1",
        '" OR 1=1 --',
    ]


def test_user_cannot_touch_another_users_data(world: World, reliability_report) -> None:
    """Alice against every route that holds per-user data, aimed at bob's ids (and guesses):
    404 like ids that do not exist, bob's data unchanged, none of bob's text in any answer."""
    w = world
    before = _bob_state(w)
    check = LeakCheck(w)
    conv_route = ("GET", "/v1/conversations/{conversation_id}")
    del_route = ("DELETE", "/v1/conversations/{conversation_id}")
    chat_route = ("POST", "/v1/chat/completions")
    fb_route, rank_route = ("POST", "/v1/feedback"), ("POST", "/v1/rankings")

    # lists: only alice's own conversations, however she pages
    for params in ({}, {"limit": 500}, {"before": "9999-01-01T00:00:00Z", "limit": 500}):
        r = check.request(("GET", "/v1/conversations"), "GET", "/v1/conversations", params=params)
        ids = {c["id"] for c in r.json()["data"]}
        if ids != {w.alice_conv}:
            check.fail(f"alice's list with {params}: {ids}")

    # a missing id and bob's id must give the same answer (no probing)
    unknown = str(uuid.uuid4())
    r_unknown = check.client.get(f"/v1/conversations/{unknown}")
    r_bob = check.request(conv_route, "GET", f"/v1/conversations/{w.bob_conv}")
    if (r_bob.status_code, _error(r_bob)["type"], _error(r_bob)["code"]) != (
        r_unknown.status_code,
        _error(r_unknown)["type"],
        _error(r_unknown)["code"],
    ) or _error(r_bob)["message"].replace(w.bob_conv, "ID") != _error(r_unknown)["message"].replace(
        unknown, "ID"
    ):
        check.fail(f"bob's conversation answers differently from a missing one: {r_bob.text}")

    for guess in _guessed_ids(w):
        check.expect_404(conv_route, "GET", f"/v1/conversations/{guess}")
        check.expect_404(del_route, "DELETE", f"/v1/conversations/{guess}")
        for index in (0, 1):
            check.expect_404(
                fb_route,
                "POST",
                "/v1/feedback",
                json={"completion_id": guess, "choice_index": index, "rating": -1},
            )
        check.expect_404(
            rank_route, "POST", "/v1/rankings", json={"completion_id": guess, "ranking": [0, 1]}
        )
    for conv in (w.bob_conv, w.bob_ws_conv):
        for stream in (False, True):
            check.expect_404(
                chat_route,
                "POST",
                "/v1/chat/completions",
                json={
                    "model": "palmchat",
                    "max_tokens": 2,
                    "stream": stream,
                    "conversation_id": conv,
                    "messages": [{"role": "user", "content": "continue bob's thread"}],
                },
            )

    # the WebSocket: continue bob's thread, rate his answer, cancel his running chat
    check.routes.add(("WS", "/v1/chat/ws"))
    with (
        ws_connect(f"{w.ws_url}?api_key={w.keys['alice']}", open_timeout=30) as alice_ws,
        ws_connect(f"{w.ws_url}?api_key={w.keys['bob']}", open_timeout=30) as bob_ws,
    ):
        alice_ws.recv(timeout=30)
        bob_ws.recv(timeout=30)
        for frame in (
            {
                "type": "chat",
                "request_id": "steal",
                "conversation_id": w.bob_conv,
                "max_tokens": 2,
                "messages": [{"role": "user", "content": "continue bob's thread"}],
            },
            {"type": "feedback", "completion_id": w.bob_ws_cid, "choice_index": 0, "rating": -1},
            {"type": "feedback", "completion_id": w.bob_cid, "choice_index": 1, "rating": -1},
        ):
            alice_ws.send(json.dumps(frame))
            got = _ws_frames_until(alice_ws, lambda f: f["type"] in ("error", "done", "feedback"))
            check.seen.append(json.dumps(got))
            if got[-1]["type"] != "error" or got[-1]["error"]["type"] != "not_found_error":
                check.fail(f"WebSocket {frame}: {got[-1]}")
        bob_ws.send(
            json.dumps(
                {
                    "type": "chat",
                    "request_id": "bobs",
                    "max_tokens": 40,
                    "ignore_eos": True,
                    "messages": [{"role": "user", "content": "a long answer please"}],
                }
            )
        )
        _ws_frames_until(bob_ws, lambda f: f["type"] in ("delta", "done"))
        alice_ws.send(json.dumps({"type": "cancel", "request_id": "bobs"}))
        got = _ws_frames_until(alice_ws, lambda f: f["type"] in ("error", "done"))
        if got[-1]["type"] != "error" or "no such running request" not in json.dumps(got[-1]):
            check.fail(f"alice cancelled bob's chat: {got[-1]}")
        done = _ws_frames_until(bob_ws, lambda f: f["type"] in ("done", "error"))[-1]
        if done["type"] != "done" or done.get("cancelled"):
            check.fail(f"bob's chat did not finish normally: {done}")
        bob_new_conv = done.get("conversation_id")

    # non-owned routes alice can call: nothing of bob's in them either
    for route, kind in ROUTES.items():
        if kind in (PUBLIC, USER) and route[0] == "GET":
            method, url, _ = _target(w, route)
            check.request(route, method, url)
    for route, kind in ROUTES.items():  # 403 for her; nothing of bob's in the refusal
        if kind == ADMIN:
            method, url, _ = _target(w, route)
            check.request(route, method, url)

    # alice still reaches her own data (the 404s above are not a broken route)
    if check.client.get(f"/v1/conversations/{w.alice_conv}").status_code != 200:
        check.fail("alice cannot read her own conversation")

    after = _bob_state(w)
    after["listed"].remove(bob_new_conv)  # bob's own new chat on the socket above
    if after != before:
        check.fail(f"bob's data changed:\nbefore {before}\nafter  {after}")
    leaks = check.leaks()
    owned = {r for r, kind in ROUTES.items() if kind == OWNED}
    reliability_report.record(
        _section(w),
        routes_checked=len(check.routes),
        routes_total=len(ROUTES),
        owned_routes_checked=len(owned & check.routes),
        guessed_ids=len(_guessed_ids(w)),
        leaks=len(leaks) + len(check.problems),
    )
    assert owned <= check.routes, f"per-user routes not probed: {owned - check.routes}"
    assert not check.problems, "\n".join(check.problems)
    assert not leaks, f"bob's canary reached alice: {leaks}"


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
        assert _ws_frames_until(ws, lambda f: f["type"] in ("done", "error"))[-1]["type"] == "done"

        assert revoke_key(w.db, key[:8]) == 1

        accepted = [
            (route, r.status_code)
            for route, kind in ROUTES.items()
            if kind != PUBLIC and route[0] != "WS"
            for r in [_http(w, route, headers)]
            if r.status_code != 401
        ]
        reliability_report.record(_section(w), revoked_key_accepted=len(accepted))
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
    assert _ws_refused(w, query_key=key) and _ws_refused(w, frame_key=key)
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
    reliability_report.record(_section(w), raw_keys_stored=len(hits), keys_checked=len(secrets))
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
        _chat(w.client(good), "logged chat")
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
            _ws_frames_until(ws, lambda f: f["type"] in ("done", "error"))
            ws.send("{not json")
            ws.recv(timeout=30)
        with ws_connect(w.ws_url, additional_headers={"Authorization": f"Bearer {other}"}) as ws:
            ws.recv(timeout=30)
        with ws_connect(w.ws_url, open_timeout=30) as ws:
            ws.send(json.dumps({"type": "auth", "api_key": other}))
            ws.recv(timeout=30)
        for k in (wrong, revoked):
            assert _ws_refused(w, query_key=k) and _ws_refused(w, frame_key=k)
    text = "\n".join(logs.lines)
    # the capture works: uvicorn's access and WebSocket lines are in it
    assert '"GET /v1/models' in text and '"WebSocket /v1/chat/ws' in text, text[-2000:]
    found = [name for name, k in keys.items() if k[8:] in text]
    reliability_report.record(
        _section(w), keys_in_logs=len(found), log_lines_checked=len(logs.lines)
    )
    assert not found, f"keys in the server log: {found}"


def _section(w: World) -> str:
    return "isolation" if w.database == "sqlite" else "isolation_postgres"
