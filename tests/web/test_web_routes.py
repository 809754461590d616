"""The page routes: HTML at / and /admin, static files with the right types, nothing else."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.api.routes.web import WEB_DIR
from shared.config import Settings


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_seed_dir: Path):
    settings = Settings(data_dir=tmp_path_factory.mktemp("web-routes"), kv_cache_memory_mb=16)
    with TestClient(create_app(settings, seed_dir=tiny_seed_dir)) as c:
        yield c


def test_pages_and_assets_are_served_without_a_key(client) -> None:
    for path, marker in (("/", "chat.js"), ("/admin", "admin.js")):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert marker in r.text
        assert "script-src 'self'" in r.headers["content-security-policy"]
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for f in sorted(WEB_DIR.iterdir()):
        if f.suffix in types:
            r = client.get(f"/static/{f.name}")
            assert r.status_code == 200, f.name
            assert r.headers["content-type"].startswith(types[f.suffix])
            assert r.content == f.read_bytes()


def test_every_asset_the_pages_name_exists_and_nothing_is_external(client) -> None:
    for page in ("index.html", "admin.html"):
        html = (WEB_DIR / page).read_text()
        for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
            if ref.startswith("/static/"):
                assert client.get(ref).status_code == 200, ref
    for f in WEB_DIR.iterdir():
        text = f.read_text()
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), f.name
        for module in re.findall(r'from "\./([^"]+)"', text):
            assert (WEB_DIR / module).is_file(), (f.name, module)


@pytest.mark.parametrize(
    "path",
    [
        "/static/../api/app.py",
        "/static/%2e%2e/%2e%2e/pyproject.toml",
        "/static/..%2f..%2fapi%2fapp.py",
        "/static/nope.js",
        "/static/",
        "/static/../../shared/seed/policy/manifest.json",
    ],
)
def test_no_file_outside_the_web_dir_or_of_another_type(client, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error"


def test_the_api_still_wins_over_the_pages(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/v1/models").status_code == 401
