"""The isolation tests' world: every route of the app classified by who may use it, a live
server with three users (alice, bob, root) and bob's data, and the probes that aim a request
at it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastapi.routing
import httpx
from sqlalchemy import select
from sqlmodel import Session
from websockets.sync.client import connect as ws_connect

from server.api.app import create_app
from shared.keys import create_key
from shared.schema import Feedback, Message, Ranking
from tests.conftest import LiveServer
from tests.reliability._databases import database_url, live_settings

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
    ("GET", "/health"): PUBLIC,
    ("GET", "/version"): PUBLIC,
    ("GET", "/docs/assets/{name}"): PUBLIC,
    ("GET", "/v1/models"): USER,
    ("GET", "/v1/models/{model:path}"): USER,
    ("POST", "/tokenize"): USER,
    ("POST", "/detokenize"): USER,
    ("GET", "/v1/policies"): USER,
    ("POST", "/v1/chat/completions"): OWNED,  # conversation_id continues one's own thread
    ("POST", "/v1/completions"): USER,  # text completions: nothing logged, nobody's data
    ("GET", "/v1/conversations"): OWNED,
    ("GET", "/v1/conversations/{conversation_id}"): OWNED,
    ("DELETE", "/v1/conversations/{conversation_id}"): OWNED,
    ("POST", "/v1/feedback"): OWNED,
    ("POST", "/v1/rankings"): OWNED,
    ("POST", "/v1/labels"): OWNED,
    ("POST", "/v1/moderations"): USER,
    ("GET", "/v1/admin/messages"): ADMIN,
    ("WS", "/v1/chat/ws"): OWNED,
    ("GET", "/v1/feedback/export"): ADMIN,
    ("POST", "/v1/policies/{version}/activate"): ADMIN,
    ("POST", "/v1/policies/rollback"): ADMIN,
    ("POST", "/v1/policies/{version}/canary"): ADMIN,
    ("POST", "/v1/policies/{version}/promote"): ADMIN,
    ("POST", "/v1/policies/{version}/abort"): ADMIN,
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


def chat(client: httpx.Client, text: str, **params: Any) -> dict[str, Any]:
    body = {"model": "palmchat", "messages": [{"role": "user", "content": text}], **params}
    r = client.post("/v1/chat/completions", json={"max_tokens": 4, **body})
    assert r.status_code == 200, r.text
    return r.json()


def ws_frames_until(ws, done: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    frames = []
    while True:
        frames.append(json.loads(ws.recv(timeout=60)))
        if done(frames[-1]):
            return frames


@contextmanager
def open_world(database: str, data_dir: Path, seed_dir: Path) -> Iterator[World]:
    """A live server on ``database`` with alice, bob and root, and bob's data made through the
    API like any user's."""
    with database_url(database) as url:
        app = create_app(live_settings(data_dir, url), seed_dir=seed_dir)
        with LiveServer(app) as live:
            w = World(live=live, app=app, database=database)
            for name in ("alice", "bob"):
                w.key(name)
            w.key("root", admin=True)
            # bob's data, made through the API like any user's
            with w.client(w.keys["bob"]) as bob:
                first = chat(bob, f"secret question {w.canary}", n=2, temperature=1.0, seed=3)
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
                done = ws_frames_until(ws, lambda f: f["type"] in ("done", "error"))[-1]
                assert done["type"] == "done", done
                w.bob_ws_conv, w.bob_ws_cid = done["conversation_id"], done["completion_id"]
            with w.client(w.keys["alice"]) as alice:
                mine = chat(alice, "alice's own question")
                w.alice_conv, w.alice_cid = mine["conversation_id"], mine["id"]
            yield w


def bob_state(w: World) -> dict[str, Any]:
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


def error(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# --------------------------------------------------------------------------- probes


def target(w: World, route: tuple[str, str]) -> tuple[str, str, Any]:
    """A concrete request for ``route`` that aims at bob's data where it takes an id."""
    method, path = route
    url = {
        "/v1/conversations/{conversation_id}": f"/v1/conversations/{w.bob_conv}",
        "/v1/policies/{version}/activate": "/v1/policies/v1/activate",
        "/v1/policies/{version}/canary": "/v1/policies/v1/canary",
        "/v1/policies/{version}/promote": "/v1/policies/v1/promote",
        "/v1/policies/{version}/abort": "/v1/policies/v1/abort",
        "/static/{name:path}": "/static/chat.js",
        "/docs/assets/{name}": "/docs/assets/swagger-ui.css",
        "/v1/models/{model:path}": "/v1/models/palmchat",
        "/v1/admin/messages": "/v1/admin/messages?end_user=bob",
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
        ("POST", "/v1/labels"): {"completion_id": w.bob_cid, "labels": ["spam"]},
        ("POST", "/v1/moderations"): {"input": "hi"},
        ("POST", "/v1/completions"): {"model": "palmchat", "prompt": "hi", "max_tokens": 2},
        ("POST", "/tokenize"): {"prompt": "hi"},
        ("POST", "/detokenize"): {"tokens": [5]},
        ("POST", "/v1/policies/{version}/canary"): {"share": 0.5},
    }.get(route)
    return method, url, body


def request_route(w: World, route: tuple[str, str], headers: dict[str, str]) -> httpx.Response:
    method, url, body = target(w, route)
    return httpx.request(method, w.url + url, json=body, headers=headers, timeout=60)


def ws_refused(w: World, *, query_key: str | None = None, frame_key: Any = None) -> bool:
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


def section(w: World) -> str:
    return "isolation" if w.database == "sqlite" else "isolation_postgres"
