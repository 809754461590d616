"""Conversations, thumbs, rankings and export over real HTTP: auth, isolation, OpenAI errors."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from server.api.app import create_app
from shared.config import Settings
from shared.keys import create_key
from shared.store import LoggedChoice, log_completion
from tests.conftest import LiveServer


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server(request: pytest.FixtureRequest, tmp_path: Path, tiny_seed_dir: Path):
    url = "" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    settings = Settings(data_dir=tmp_path, database_url=url)
    app = create_app(settings, seed_dir=tiny_seed_dir)
    with LiveServer(app) as live:
        live.db = app.state.palmchat.db
        yield live


def _completion(db, user_id: int, cid: str, n: int = 3) -> str:
    return log_completion(
        db,
        user_id=user_id,
        completion_id=cid,
        messages=[{"role": "user", "content": "What is 2 + 2?"}],
        choices=[LoggedChoice(i, f"answer {i}", "stop", 3) for i in range(n)],
        prompt_tokens=5,
        policy_version="v1",
        sampling_params={"temperature": 1.0},
        latency_ms=12.0,
    )


def _client(server, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=30)


def _user(server, name: str, admin: bool = False) -> tuple[str, int]:
    from shared.keys import resolve_key

    key = create_key(server.db, name, admin=admin)
    return key, resolve_key(server.db, key).user_id


def test_missing_or_bad_key_gets_401_in_openai_shape(server) -> None:
    for key in (None, "pc-not-a-key"):
        r = _client(server, key).get("/v1/conversations")
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_thumbs_and_ranking_are_stored_and_exported(server) -> None:
    key, uid = _user(server, "alice")
    admin_key, _ = _user(server, "root", admin=True)
    conv = _completion(server.db, uid, "chatcmpl-a")
    alice = _client(server, key)
    r = alice.post(
        "/v1/feedback",
        json={"completion_id": "chatcmpl-a", "choice_index": 1, "rating": 1, "reason": "clear"},
    )
    assert r.status_code == 200 and r.json()["rating"] == 1
    r = alice.post(
        "/v1/feedback", json={"completion_id": "chatcmpl-a", "choice_index": 1, "rating": -1}
    )
    assert r.json()["rating"] == -1  # second vote replaces the first
    r = alice.post("/v1/rankings", json={"completion_id": "chatcmpl-a", "ranking": [2, 0, 1]})
    assert r.status_code == 200
    thread = alice.get(f"/v1/conversations/{conv}").json()
    assert [m["rating"] for m in thread["messages"] if m["role"] == "assistant"] == [None, -1, None]
    export = _client(server, admin_key).get("/v1/feedback/export", params={"format": "preference"})
    rows = [json.loads(line) for line in export.text.splitlines()]
    assert len(rows) == 3
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "answer 2"}]
    assert rows[0]["prompt"] == [{"role": "user", "content": "What is 2 + 2?"}]
    kto = _client(server, admin_key).get("/v1/feedback/export", params={"format": "kto"})
    assert [json.loads(x)["label"] for x in kto.text.splitlines()] == [False]


def test_other_users_data_is_404_and_export_is_admin_only(server) -> None:
    key_a, uid_a = _user(server, "alice")
    key_b, _ = _user(server, "bob")
    conv = _completion(server.db, uid_a, "chatcmpl-b")
    bob = _client(server, key_b)
    assert bob.get(f"/v1/conversations/{conv}").status_code == 404
    assert bob.delete(f"/v1/conversations/{conv}").status_code == 404
    assert (
        bob.post("/v1/feedback", json={"completion_id": "chatcmpl-b", "rating": 1}).status_code
        == 404
    )
    assert (
        bob.post(
            "/v1/rankings", json={"completion_id": "chatcmpl-b", "ranking": [0, 1]}
        ).status_code
        == 404
    )
    assert bob.get("/v1/conversations").json()["data"] == []
    assert bob.get("/v1/feedback/export").status_code == 403
    alice = _client(server, key_a)
    assert [c["id"] for c in alice.get("/v1/conversations").json()["data"]] == [conv]
    assert alice.delete(f"/v1/conversations/{conv}").status_code == 204
    assert alice.get(f"/v1/conversations/{conv}").status_code == 404


def test_bad_feedback_is_400_with_the_param_named(server) -> None:
    key, uid = _user(server, "alice")
    _completion(server.db, uid, "chatcmpl-c")
    c = _client(server, key)
    r = c.post("/v1/feedback", json={"completion_id": "chatcmpl-c", "rating": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "rating"
    r = c.post("/v1/rankings", json={"completion_id": "chatcmpl-c", "ranking": [0, 0]})
    assert r.status_code == 400
    r = c.post("/v1/feedback", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_health_and_readiness(server) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").json() == {"status": "ready", "policy_version": "v1"}


def test_rate_limit_gives_429_with_retry_after(tmp_path: Path, tiny_seed_dir: Path) -> None:
    settings = Settings(data_dir=tmp_path, rate_limit_per_minute=60, rate_limit_burst=3)
    app = create_app(settings, seed_dir=tiny_seed_dir)
    with LiveServer(app) as live:
        key = create_key(app.state.palmchat.db, "alice")
        other = create_key(app.state.palmchat.db, "bob")
        c = httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        codes = [c.get("/v1/conversations").status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
        r = c.get("/v1/conversations")
        assert (
            r.json()["error"]["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
        )
        # another key has its own bucket
        assert (
            httpx.get(
                f"{live.url}/v1/conversations", headers={"Authorization": f"Bearer {other}"}
            ).status_code
            == 200
        )


def test_oversized_body_gets_413_and_the_server_keeps_serving(server) -> None:
    key, _ = _user(server, "alice")
    c = _client(server, key)
    r = c.post(
        "/v1/feedback", content=b"x" * 2_000_000, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert c.get("/v1/conversations").status_code == 200
