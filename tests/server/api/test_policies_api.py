"""Policy admin over HTTP: list with feedback stats, activate, roll back, refuse corrupt."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from server.api.app import create_app
from shared.config import Settings
from shared.keys import create_key
from tests.conftest import LiveServer


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
