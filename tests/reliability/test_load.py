"""Load: 64 concurrent streaming clients (half SSE, half WebSocket) against a real server on
loopback for a bounded time; then a burst over the waiting-queue bound.

Under load every request must finish (no errors, no timeouts), every answer must be logged
exactly once under the completion id the client got, with the text the client got, and the
engine must end idle with every KV block back. The burst must get 429s (never 500s, broken
streams or timeouts) and the server must serve again right after.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import httpx
import pytest

from server.api.app import create_app
from shared.config import Settings
from shared.keys import create_key
from tests.conftest import LiveServer
from tests.reliability._streams import (
    chat_body,
    check_logged_once,
    metric_sum,
    percentile,
    scrape,
    sse_chat,
    stream_until,
    ws_chat,
    ws_connect,
)

pytestmark = pytest.mark.slow

CLIENTS = 64  # half SSE, half WebSocket
MAX_TOKENS = 12
PROMPTS = [
    "What is 2 + 3?",
    "Sort these numbers: 5, 3, 9.",
    "Say hello to my friend.",
    "Name a colour of the sky.",
    "Spell the word cat backwards.",
]


async def _engine_idle(engine, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.running == 0 and s.waiting == 0 and s.kv_blocks_used == 0:
            return
        await asyncio.sleep(0.02)


def _sampled_chat(i: int, n: int, rng: random.Random) -> dict:
    """Client ``i``'s ``n``-th chat: a sampled answer with its own seed."""
    return chat_body(
        f"{rng.choice(PROMPTS)} (client {i}, turn {n})",
        max_tokens=MAX_TOKENS,
        temperature=0.8,
        seed=rng.randrange(1 << 30),
    )


@pytest.mark.parametrize(
    ("database", "duration_s"),
    [("sqlite", 20.0), pytest.param("postgres", 10.0, marks=pytest.mark.postgres)],
)
async def test_64_streaming_clients_no_errors_every_answer_logged_once(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    tiny_seed_dir: Path,
    reliability_report,
    database: str,
    duration_s: float,
) -> None:
    url = "" if database == "sqlite" else request.getfixturevalue("postgres_url")
    settings = Settings(data_dir=tmp_path, database_url=url, kv_cache_memory_mb=16)
    app = create_app(settings, seed_dir=tiny_seed_dir)
    state = app.state.palmchat
    with LiveServer(app) as live:
        # one user and key per client: the per-key rate limit stays at its default
        keys = [create_key(state.db, f"load-{i}") for i in range(CLIENTS)]
        before = scrape(live.url)
        started = time.monotonic()
        results = await stream_until(live.url, keys, started + duration_s, _sampled_chat)
        elapsed = time.monotonic() - started
        engine = state.engine
        await _engine_idle(engine)
        stats = engine.stats()
        after = scrape(live.url)

    errors = [r for r in results if r.status != "ok"]
    problems = check_logged_once(results, state.db)
    ok = [r for r in results if r.status == "ok"]
    ttfts = [r.ttft_s for r in ok]
    served = {r.transport for r in ok}
    # each stream's one choice finished normally (stop or length), counted once
    finished_ok = sum(
        metric_sum(after, "palmchat_request_success_total", finish_reason=reason)
        - metric_sum(before, "palmchat_request_success_total", finish_reason=reason)
        for reason in ("stop", "length")
    )
    ttft_count = after["palmchat_time_to_first_token_seconds_count"] - before.get(
        "palmchat_time_to_first_token_seconds_count", 0
    )
    reliability_report.record(
        "load" if database == "sqlite" else "load_postgres",
        database=database,
        clients=CLIENTS,
        sse_clients=CLIENTS // 2,
        ws_clients=CLIENTS - CLIENTS // 2,
        max_tokens=MAX_TOKENS,
        duration_s=round(elapsed, 2),
        requests=len(results),
        requests_per_s=round(len(results) / elapsed, 2),
        errors=len(errors),
        p50_ttft_s=round(percentile(ttfts, 50), 4) if ttfts else None,
        p95_ttft_s=round(percentile(ttfts, 95), 4) if ttfts else None,
        max_ttft_s=round(max(ttfts), 4) if ttfts else None,
        generated_tokens=sum(r.completion_tokens or 0 for r in ok),
        log_problems=len(problems),
        items_lost=len(problems) + len(errors),
    )
    assert not errors, f"{len(errors)} of {len(results)} failed: {[e.detail for e in errors[:5]]}"
    assert served == {"sse", "ws"} and len(ok) >= CLIENTS  # every client finished a chat
    assert not problems, problems[:10]
    assert len({r.completion_id for r in ok}) == len(ok)  # ids are unique
    # the server counted exactly these requests and a first token for each
    assert finished_ok == len(ok) and ttft_count == len(ok)
    # every sequence finished and every KV block is back
    assert stats.running == 0 and stats.waiting == 0 and stats.kv_blocks_used == 0
    assert (
        after["palmchat_num_requests_running"] == 0 and after["palmchat_kv_cache_usage_perc"] == 0
    )


async def test_burst_over_queue_bound_gets_429_and_the_server_recovers(
    tmp_path: Path, tiny_seed_dir: Path, reliability_report
) -> None:
    """48 streaming chats at once (SSE and WebSocket) against a 2-deep waiting queue and a
    tiny KV cache: each one either streams a complete answer or is refused with a 429 /
    ``overloaded`` frame up front; nothing breaks off, times out or fails otherwise."""
    settings = Settings(data_dir=tmp_path, kv_cache_memory_mb=1, max_waiting=2)
    app = create_app(settings, seed_dir=tiny_seed_dir)
    state = app.state.palmchat
    with LiveServer(app) as live:
        key = create_key(state.db, "burst")
        body = chat_body("Sort these numbers: 5, 3, 9.", max_tokens=60, temperature=1.0)
        before = scrape(live.url)
        async with httpx.AsyncClient(timeout=60) as http:
            sockets = await asyncio.gather(*[ws_connect(live.url, key) for _ in range(24)])
            burst = await asyncio.gather(
                *[sse_chat(http, live.url, key, {**body, "seed": i}) for i in range(24)],
                *[ws_chat(ws, f"b{i}", {**body, "seed": 100 + i}) for i, ws in enumerate(sockets)],
            )
            # recovery: a request of each kind right after the burst succeeds
            again = [
                await sse_chat(http, live.url, key, chat_body("hi", max_tokens=4)),
                await ws_chat(sockets[0], "after", chat_body("hi", max_tokens=4)),
            ]
            for ws in sockets:
                await ws.close()
        await _engine_idle(state.engine)
        stats = state.engine.stats()
        after = scrape(live.url)

    outcomes = [r.status for r in burst]
    refused = outcomes.count("overloaded")
    other = [f"{r.transport}: {r.detail}" for r in burst if r.status == "error"]
    overloaded_metric = metric_sum(
        after, "palmchat_requests_total", code="overloaded"
    ) - metric_sum(before, "palmchat_requests_total", code="overloaded")
    reliability_report.record(
        "load",
        burst_requests=len(burst),
        burst_max_waiting=2,
        burst_ok=outcomes.count("ok"),
        burst_429=refused,
        burst_other=len(other),
        burst_recovered=all(r.status == "ok" for r in again),
    )
    assert not other, other[:5]
    assert refused > 0 and outcomes.count("ok") > 0
    assert {r.transport for r in burst if r.status == "overloaded"} == {"sse", "ws"}
    assert [r.status for r in again] == ["ok", "ok"], [r.detail for r in again]
    assert overloaded_metric == refused
    # the answers that ran are logged once each; the refused ones never ran and are not logged
    assert not check_logged_once([*burst, *again], state.db)
    assert stats.running == 0 and stats.kv_blocks_used == 0
