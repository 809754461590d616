"""Every finished request is counted in /metrics with its endpoint, HTTP status class and error
code (the error-rate alert and the admin page read these), and a key's rate-limit standing
comes back in OpenAI's x-ratelimit-* headers."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
import websockets

from server.api.app import create_app
from shared.config import Settings
from shared.keys import create_key
from tests.conftest import LiveServer, live_app

MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


def scrape(url: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("palmchat_requests_total{") or line.startswith(
            "palmchat_request_success_total{"
        ):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def counted(before: dict[str, float], after: dict[str, float], series: str) -> float:
    return after.get(series, 0.0) - before.get(series, 0.0)


def series(endpoint: str, status: str, code: str = "") -> str:
    return f'palmchat_requests_total{{code="{code}",endpoint="{endpoint}",status="{status}"}}'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_seed_dir: Path):
    limits = {"rate_limit_per_minute": 600, "rate_limit_burst": 50}
    counting = tmp_path_factory.mktemp("counting")
    with live_app(counting, tiny_seed_dir, user="alice", kv_cache_memory_mb=16, **limits) as live:
        yield live


async def test_every_outcome_is_counted_with_its_status_class_and_code(server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0)
    chat = "/v1/chat/completions"
    before = scrape(server.url)
    client.chat.completions.create(model="palmchat", messages=MESSAGES, max_tokens=3, n=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="pc-wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="palmchat", messages=MESSAGES, temperature=9)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="palmchat", messages=MESSAGES, tools=[{"x": 1}])
    assert httpx.get(f"{server.url}/no/such/page").status_code == 404
    body = httpx.post(
        f"{server.url}{chat}",
        content=b"x" * 2_000_000,
        headers={"Authorization": f"Bearer {server.key}", "content-type": "application/json"},
    )
    assert body.status_code == 413
    url = server.url.replace("http", "ws") + f"/v1/chat/ws?api_key={server.key}"
    async with websockets.connect(url) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        for rid, extra in (("ok", {}), ("bad", {"temperature": 9})):
            frame = {"type": "chat", "request_id": rid, "max_tokens": 3, "messages": MESSAGES}
            await ws.send(json.dumps({**frame, **extra}))
        seen = set()
        while len(seen) < 2:
            frame = json.loads(await ws.recv())
            if frame["type"] in ("done", "error"):
                seen.add(frame["request_id"])
    after = scrape(server.url)

    assert counted(before, after, series(chat, "2xx")) == 1  # one request, n=2
    assert counted(before, after, series("/v1/models", "4xx", "invalid_api_key")) == 1
    assert counted(before, after, series(chat, "4xx", "model_not_found")) == 1
    assert counted(before, after, series(chat, "4xx", "invalid_value")) == 1
    assert counted(before, after, series(chat, "4xx", "unsupported_parameter")) == 1
    assert counted(before, after, series("unmatched", "4xx", "not_found_error")) == 1
    assert counted(before, after, series("unmatched", "4xx", "413")) == 1
    assert counted(before, after, series("/v1/chat/ws", "2xx")) == 1
    assert counted(before, after, series("/v1/chat/ws", "4xx", "invalid_value")) == 1
    # each of the n choices (and the WebSocket chat's) has its finish reason
    finished = sum(
        counted(before, after, k) for k in after if k.startswith("palmchat_request_success")
    )
    assert finished == 3
    # scrapes are not counted as traffic
    assert not any('endpoint="/metrics"' in k for k in after)


def test_rate_limit_headers_follow_openais(server) -> None:
    r = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {server.key}"})
    assert r.status_code == 200
    assert r.headers["x-ratelimit-limit-requests"] == "50"
    assert 0 <= int(r.headers["x-ratelimit-remaining-requests"]) < 50
    assert r.headers["x-ratelimit-reset-requests"].endswith("s")


def test_a_429_carries_the_quota_too(tmp_path: Path, tiny_seed_dir: Path) -> None:
    settings = Settings(data_dir=tmp_path, rate_limit_per_minute=60, rate_limit_burst=2)
    app = create_app(settings, seed_dir=tiny_seed_dir)
    with LiveServer(app) as live:
        key = create_key(app.state.palmchat.db, "alice")
        c = httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        remaining = [
            c.get("/v1/models").headers.get("x-ratelimit-remaining-requests") for _ in "ab"
        ]
        assert remaining == ["1", "0"]
        r = c.get("/v1/models")
        assert r.status_code == 429 and r.headers["x-ratelimit-remaining-requests"] == "0"
        assert r.headers["x-ratelimit-reset-requests"] in ("2s", "3s")
        assert int(r.headers["retry-after"]) >= 1
