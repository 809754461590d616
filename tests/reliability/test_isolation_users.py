"""Isolation on a live server (real uvicorn, real engine, SQLite and PostgreSQL): user A cannot
read, list, delete, continue, rate or rank user B's conversations and completions (REST and
WebSocket), also with guessed ids; the answers are the same 404 as for ids that do not exist,
and nothing A receives contains B's text (canaries).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
from sqlalchemy import select
from sqlmodel import Session
from websockets.sync.client import connect as ws_connect

from shared.schema import Message
from tests.reliability._world import (
    ADMIN,
    OWNED,
    PUBLIC,
    ROUTES,
    USER,
    World,
    bob_state,
    error,
    section,
    target,
    ws_frames_until,
)


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
        if r.status_code != 404 or error(r)["type"] != "not_found_error":
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
    before = bob_state(w)
    check = LeakCheck(w)
    conv_route = ("GET", "/v1/conversations/{conversation_id}")
    del_route = ("DELETE", "/v1/conversations/{conversation_id}")
    chat_route = ("POST", "/v1/chat/completions")
    fb_route, rank_route = ("POST", "/v1/feedback"), ("POST", "/v1/rankings")
    label_route = ("POST", "/v1/labels")

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
    if (r_bob.status_code, error(r_bob)["type"], error(r_bob)["code"]) != (
        r_unknown.status_code,
        error(r_unknown)["type"],
        error(r_unknown)["code"],
    ) or error(r_bob)["message"].replace(w.bob_conv, "ID") != error(r_unknown)["message"].replace(
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
        check.expect_404(
            label_route, "POST", "/v1/labels", json={"completion_id": guess, "labels": ["spam"]}
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
            got = ws_frames_until(alice_ws, lambda f: f["type"] in ("error", "done", "feedback"))
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
        ws_frames_until(bob_ws, lambda f: f["type"] in ("delta", "done"))
        alice_ws.send(json.dumps({"type": "cancel", "request_id": "bobs"}))
        got = ws_frames_until(alice_ws, lambda f: f["type"] in ("error", "done"))
        if got[-1]["type"] != "error" or "no such running request" not in json.dumps(got[-1]):
            check.fail(f"alice cancelled bob's chat: {got[-1]}")
        done = ws_frames_until(bob_ws, lambda f: f["type"] in ("done", "error"))[-1]
        if done["type"] != "done" or done.get("cancelled"):
            check.fail(f"bob's chat did not finish normally: {done}")
        bob_new_conv = done.get("conversation_id")

    # non-owned routes alice can call: nothing of bob's in them either
    for route, kind in ROUTES.items():
        if kind in (PUBLIC, USER) and route[0] == "GET":
            method, url, _ = target(w, route)
            check.request(route, method, url)
    for route, kind in ROUTES.items():  # 403 for her; nothing of bob's in the refusal
        if kind == ADMIN:
            method, url, _ = target(w, route)
            check.request(route, method, url)

    # alice still reaches her own data (the 404s above are not a broken route)
    if check.client.get(f"/v1/conversations/{w.alice_conv}").status_code != 200:
        check.fail("alice cannot read her own conversation")

    after = bob_state(w)
    after["listed"].remove(bob_new_conv)  # bob's own new chat on the socket above
    if after != before:
        check.fail(f"bob's data changed:\nbefore {before}\nafter  {after}")
    leaks = check.leaks()
    owned = {r for r, kind in ROUTES.items() if kind == OWNED}
    reliability_report.record(
        section(w),
        routes_checked=len(check.routes),
        routes_total=len(ROUTES),
        owned_routes_checked=len(owned & check.routes),
        guessed_ids=len(_guessed_ids(w)),
        leaks=len(leaks) + len(check.problems),
    )
    assert owned <= check.routes, f"per-user routes not probed: {owned - check.routes}"
    assert not check.problems, "\n".join(check.problems)
    assert not leaks, f"bob's canary reached alice: {leaks}"
