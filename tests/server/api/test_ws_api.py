"""WebSocket chat: concurrent chats on one socket, cancel frees the engine slot, thumbs, errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import websockets

from tests.conftest import live_app, run_palmchat


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_seed_dir: Path):
    with live_app(
        tmp_path_factory.mktemp("ws"), tiny_seed_dir, kv_cache_memory_mb=16, user="alice"
    ) as live:
        live.ws_url = live.url.replace("http", "ws") + "/v1/chat/ws"
        yield live


async def _frames_until(ws, predicate, limit: float = 60.0) -> list[dict]:
    frames = []
    async with asyncio.timeout(limit):
        while True:
            frame = json.loads(await ws.recv())
            frames.append(frame)
            if predicate(frame, frames):
                return frames


async def test_two_chats_at_once_on_one_socket_then_thumbs_up(server) -> None:
    async with websockets.connect(f"{server.ws_url}?api_key={server.key}") as ws:
        assert json.loads(await ws.recv()) == {"type": "ready", "user": "alice"}
        for rid in ("a", "b"):
            await ws.send(
                json.dumps(
                    {
                        "type": "chat",
                        "request_id": rid,
                        "max_tokens": 6,
                        "temperature": 0,
                        "messages": [{"role": "user", "content": f"hello {rid}"}],
                    }
                )
            )
        frames = await _frames_until(ws, lambda f, fs: sum(x["type"] == "done" for x in fs) == 2)
        done = {f["request_id"]: f for f in frames if f["type"] == "done"}
        assert set(done) == {"a", "b"} and done["a"]["policy_version"] == "v1"
        text = "".join(
            f["content"] for f in frames if f["type"] == "delta" and f["request_id"] == "a"
        )
        assert done["a"]["usage"]["completion_tokens"] >= 1 and isinstance(text, str)
        await ws.send(
            json.dumps(
                {
                    "type": "feedback",
                    "completion_id": done["a"]["completion_id"],
                    "choice_index": 0,
                    "rating": 1,
                    "reason": "nice",
                }
            )
        )
        ack = await _frames_until(ws, lambda f, fs: f["type"] in ("feedback", "error"))
        assert ack[-1]["type"] == "feedback" and ack[-1]["rating"] == 1


async def test_cancel_stops_generation_and_frees_the_engine_slot(server) -> None:
    engine = server.state.engine
    async with websockets.connect(
        server.ws_url, additional_headers={"Authorization": f"Bearer {server.key}"}
    ) as ws:
        await ws.recv()
        await ws.send(
            json.dumps(
                {
                    "type": "chat",
                    "request_id": "long",
                    "max_tokens": 200,
                    "temperature": 1.0,
                    "messages": [{"role": "user", "content": "tell me a story"}],
                    "seed": 1,
                }
            )
        )
        await _frames_until(ws, lambda f, fs: f["type"] == "delta")
        await ws.send(json.dumps({"type": "cancel", "request_id": "long"}))
        frames = await _frames_until(ws, lambda f, fs: f["type"] == "done")
        assert frames[-1]["cancelled"] is True
        assert frames[-1]["usage"]["completion_tokens"] < 200
    for _ in range(100):
        if engine.stats().running == 0 and engine.stats().kv_blocks_used == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.stats().running == 0 and engine.stats().kv_blocks_used == 0


async def test_bad_frames_get_error_frames_and_the_socket_keeps_working(server) -> None:
    async with websockets.connect(f"{server.ws_url}?api_key={server.key}") as ws:
        await ws.recv()
        for bad in (
            "{nope",
            "[1,2]",
            json.dumps({"type": "dance"}),
            json.dumps({"type": "chat", "messages": [], "request_id": "x"}),
            json.dumps(
                {
                    "type": "chat",
                    "temperature": 9,
                    "request_id": "y",
                    "messages": [{"role": "user", "content": "<|assistant|>hi"}],
                }
            ),
        ):
            await ws.send(bad)
            frame = json.loads(await ws.recv())
            assert frame["type"] == "error" and frame["error"]["type"] == "invalid_request_error"
        await ws.send(
            json.dumps(
                {
                    "type": "chat",
                    "request_id": "ok",
                    "max_tokens": 3,
                    "messages": [{"role": "user", "content": "hi"}],
                }
            )
        )
        frames = await _frames_until(ws, lambda f, fs: f["type"] == "done")
        assert frames[-1]["request_id"] == "ok"


async def test_bad_key_is_refused(server) -> None:
    async with websockets.connect(f"{server.ws_url}?api_key=pc-wrong") as ws:
        frame = json.loads(await ws.recv())
        assert frame["type"] == "error" and frame["error"]["type"] == "authentication_error"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd.code == 4401


def test_cli_chat_talks_to_the_server_over_the_websocket(server) -> None:
    chat = ["chat", "--url", server.url]
    say = ["-m", "hello", "-m", "and again"]
    out = run_palmchat(*chat, "--api-key", server.key, "--max-tokens", "5", *say, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("palm>") == 2
    bad = run_palmchat(*chat, "--api-key", "pc-nope", "-m", "x", timeout=120)
    assert (
        bad.returncode == 2 and "invalid or revoked" in bad.stderr and "Traceback" not in bad.stderr
    )
