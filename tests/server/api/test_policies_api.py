"""Policy admin over HTTP: list with feedback stats, activate, roll back, refuse corrupt."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from server.api.app import create_app
from shared.config import Settings
from shared.keys import create_key
from tests.conftest import LiveServer, live_app


@pytest.fixture
def server(tmp_path: Path, tiny_seed_dir: Path):
    app = create_app(Settings(data_dir=tmp_path), seed_dir=tiny_seed_dir)
    with LiveServer(app) as live:
        live.state = app.state.palmchat
        yield live


def _active(client: httpx.Client) -> str:
    rows = client.get("/v1/policies").json()["data"]
    return [r["version"] for r in rows if r["status"] == "active"][0]


def test_admin_activates_and_rolls_back_a_version(server) -> None:
    registry = server.state.registry
    v2 = registry.install(registry.path("v1"), parent="v1")
    admin = httpx.Client(
        base_url=server.url,
        timeout=30,
        headers={"Authorization": f"Bearer {create_key(server.state.db, 'root', admin=True)}"},
    )
    rows = admin.get("/v1/policies").json()["data"]
    assert [(r["version"], r["status"]) for r in rows] == [("v1", "active"), (v2, "candidate")]
    assert rows[0]["feedback_count"] == 0
    r = admin.post(f"/v1/policies/{v2}/activate")
    assert r.status_code == 200 and r.json() == {
        "object": "policy.activation",
        "active": v2,
        "previous": "v1",
    }
    assert _active(admin) == v2
    r = admin.post("/v1/policies/rollback")
    assert r.json()["active"] == "v1" and _active(admin) == "v1"


def test_corrupt_version_is_refused_and_the_current_one_stays(server) -> None:
    registry = server.state.registry
    v2 = registry.install(registry.path("v1"))
    weights = registry.path(v2) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    admin = httpx.Client(
        base_url=server.url,
        timeout=30,
        headers={"Authorization": f"Bearer {create_key(server.state.db, 'root', admin=True)}"},
    )
    r = admin.post(f"/v1/policies/{v2}/activate")
    assert r.status_code == 409 and "model.safetensors" in r.json()["error"]["message"]
    assert _active(admin) == "v1"
    assert admin.post("/v1/policies/v99/activate").status_code == 404


def test_non_admin_cannot_activate(server) -> None:
    user = httpx.Client(
        base_url=server.url,
        timeout=30,
        headers={"Authorization": f"Bearer {create_key(server.state.db, 'alice')}"},
    )
    assert user.get("/v1/policies").status_code == 200
    r = user.post("/v1/policies/v1/activate")
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert user.post("/v1/policies/rollback").status_code == 403


def _versions_seen(url: str, key: str, users: list[str]) -> dict[str, str]:
    """The version that answered each ``user`` (the request's ``user`` field)."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    return {
        user: client.chat.completions.create(
            model="palmchat",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            user=user,
        ).system_fingerprint
        for user in users
    }


@pytest.mark.parametrize("backend", ["engine", "process"])
def test_a_canary_serves_its_share_of_users_until_promoted_or_aborted(
    backend: str, tmp_path: Path, tiny_seed_dir: Path
) -> None:
    with live_app(tmp_path, tiny_seed_dir, backend=backend, rate_limit_per_minute=0) as server:
        _canary_rollouts(server)


def _canary_rollouts(server) -> None:
    registry = server.state.registry
    v2 = registry.install(registry.path("v1"), parent="v1")
    v3 = registry.install(registry.path("v1"), parent="v1")
    key = create_key(server.state.db, "root", admin=True)
    admin = httpx.Client(
        base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {key}"}
    )
    users = [f"user-{i}" for i in range(40)]

    r = admin.post(f"/v1/policies/{v2}/canary", json={"share": 0.5})
    assert r.status_code == 200, r.text
    assert (r.json()["version"], r.json()["share"]) == (v2, 0.5)
    seen = _versions_seen(server.url, key, users)
    on_canary = {u for u, v in seen.items() if v == v2}
    assert set(seen.values()) == {"v1", v2} and 8 <= len(on_canary) <= 32
    assert _versions_seen(server.url, key, users) == seen  # each user stays on their version
    rows = {r["version"]: r for r in admin.get("/v1/policies").json()["data"]}
    assert (rows[v2]["status"], rows[v2]["canary_share"]) == ("canary", 0.5)
    assert "palmchat_canary_share 0.5" in httpx.get(f"{server.url}/metrics").text

    # one canary at a time; a bad share is a 400 in OpenAI's shape
    r = admin.post(f"/v1/policies/{v3}/canary", json={"share": 0.5})
    assert r.status_code == 400 and "already in canary" in r.json()["error"]["message"]
    assert admin.post(f"/v1/policies/{v2}/canary", json={"share": 1.5}).status_code == 400

    r = admin.post(f"/v1/policies/{v2}/promote", json={"reason": "users like it"})
    assert r.status_code == 200 and r.json()["previous"] == "v1"
    assert set(_versions_seen(server.url, key, users).values()) == {v2}
    rows = {r["version"]: r for r in admin.get("/v1/policies").json()["data"]}
    assert rows[v2]["status"] == "active" and rows["v1"]["status"] == "retired"
    assert rows[v2]["decision"]["action"] == "promote"
    assert rows[v2]["decision"]["reason"] == "users like it"

    assert admin.post(f"/v1/policies/{v3}/canary", json={"share": 0.5}).status_code == 200
    assert set(_versions_seen(server.url, key, users).values()) == {v2, v3}
    assert admin.post(f"/v1/policies/{v3}/abort").status_code == 200
    assert set(_versions_seen(server.url, key, users).values()) == {v2}
    rows = {r["version"]: r for r in admin.get("/v1/policies").json()["data"]}
    assert rows[v3]["status"] == "rejected" and rows[v3]["decision"]["action"] == "abort"
    assert "palmchat_canary_share 0.0" in httpx.get(f"{server.url}/metrics").text
    assert admin.post(f"/v1/policies/{v3}/promote").status_code == 400  # no longer a canary
