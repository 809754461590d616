"""End-to-end serving flows: candidates + ranking, cut streams logged incomplete, overload 429,
admin activation reaching the next request — on SQLite and PostgreSQL, and with the engine
core in a process of its own."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from server.api.app import create_app
from shared.config import Settings
from shared.keys import create_key
from tests.conftest import LiveServer, live_app, ok_or_429

MESSAGES = [{"role": "user", "content": "Sort these numbers: 5, 3, 9."}]


@pytest.fixture(
    params=[
        ("sqlite", "engine"),
        pytest.param(("postgres", "engine"), marks=pytest.mark.postgres),
        ("sqlite", "process"),
    ],
    ids=["sqlite", "postgres", "process"],
)
def server(request: pytest.FixtureRequest, tmp_path: Path, tiny_seed_dir: Path):
    db, backend = request.param
    url = "" if db == "sqlite" else request.getfixturevalue("postgres_url")
    settings = Settings(
        data_dir=tmp_path, database_url=url, kv_cache_memory_mb=16, policy_poll_seconds=0.2
    )
    app = create_app(settings, seed_dir=tiny_seed_dir, backend=backend)
    with LiveServer(app) as live:
        live.state = app.state.palmchat
        live.key = create_key(live.state.db, "alice")
        live.admin = create_key(live.state.db, "root", admin=True)
        yield live


def _http(server, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_three_candidates_ranked_and_exported_as_pairs(server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0)
    r = client.chat.completions.create(
        model="palmchat", messages=MESSAGES, n=3, max_tokens=6, seed=3
    )
    assert len(r.choices) == 3
    ranked = _http(server, server.key).post(
        "/v1/rankings", json={"completion_id": r.id, "ranking": [1, 2, 0]}
    )
    assert ranked.status_code == 200
    rows = (
        _http(server, server.admin).get("/v1/feedback/export", params={"format": "preference"}).text
    )
    pairs = [json.loads(line) for line in rows.splitlines()]
    assert len(pairs) == 3
    by_index = {c.index: c.message.content for c in r.choices}
    assert pairs[0]["chosen"][0]["content"] == by_index[1]
    assert pairs[0]["prompt"] == MESSAGES


def test_client_gone_mid_sse_is_logged_incomplete_and_frees_the_engine(server) -> None:
    engine = server.state.engine
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        timeout=60,
        headers={"Authorization": f"Bearer {server.key}"},
        json={
            "model": "palmchat",
            "messages": MESSAGES,
            "max_tokens": 200,
            "temperature": 1.0,
            "seed": 5,
            "stream": True,
        },
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                break  # leave after the first token
    deadline = time.monotonic() + 30
    convs = []
    while time.monotonic() < deadline:
        convs = _http(server, server.key).get("/v1/conversations").json()["data"]
        if convs and engine.stats().running == 0:
            break
        time.sleep(0.1)
    assert engine.stats().running == 0 and engine.stats().kv_blocks_used == 0
    thread = _http(server, server.key).get(f"/v1/conversations/{convs[0]['id']}").json()
    answer = [m for m in thread["messages"] if m["role"] == "assistant"][0]
    assert answer["incomplete"] is True


@pytest.mark.parametrize("backend", ["engine", "process"])
async def test_burst_over_the_queue_bound_gets_429_and_the_server_recovers(
    tmp_path: Path, tiny_seed_dir: Path, backend: str
) -> None:
    small = dict(kv_cache_memory_mb=1, max_waiting=2)
    with live_app(tmp_path, tiny_seed_dir, user="alice", backend=backend, **small) as live:
        client = openai.AsyncOpenAI(
            base_url=f"{live.url}/v1", api_key=live.key, max_retries=0, timeout=120
        )
        chat = client.chat.completions.create
        burst = [
            chat(model="palmchat", messages=MESSAGES, max_tokens=120, temperature=1.0, seed=1)
            for _ in range(48)
        ]
        codes = await asyncio.gather(*[ok_or_429(call) for call in burst])
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        after = await client.chat.completions.create(
            model="palmchat", messages=MESSAGES, max_tokens=3
        )
        assert after.choices[0].finish_reason in ("stop", "length")


def test_version_activated_by_admin_serves_the_next_request(server) -> None:
    registry = server.state.registry
    v2 = registry.install(registry.path("v1"), parent="v1")
    r = _http(server, server.admin).post(f"/v1/policies/{v2}/activate")
    assert r.status_code == 200
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0)
    answer = client.chat.completions.create(model="palmchat", messages=MESSAGES, max_tokens=3)
    assert answer.system_fingerprint == v2
    assert [m.id for m in client.models.list()] == ["palmchat", v2]


def test_version_activated_elsewhere_is_picked_up_by_polling(server) -> None:
    from shared.policies import activate

    registry = server.state.registry
    v2 = registry.install(registry.path("v1"), parent="v1")
    activate(server.state.db, registry, v2)  # e.g. the trainer or another gateway
    deadline = time.monotonic() + 30
    while server.state.engine.version != v2:
        assert time.monotonic() < deadline, "server did not hot-swap"
        time.sleep(0.1)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0)
    assert (
        client.chat.completions.create(
            model="palmchat", messages=MESSAGES, max_tokens=2
        ).system_fingerprint
        == v2
    )
