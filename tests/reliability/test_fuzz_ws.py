"""Fuzzing a live server's WebSocket (real uvicorn, real engine, real database).

* Hypothesis generates WebSocket frames (random JSON, non-JSON text, binary, chat / cancel /
  feedback frames with wrong types): each gets one terminal frame (``error``, ``done`` or
  ``feedback``), never a server error, and the socket keeps serving.
* Hand-made abuse: invalid UTF-8, lone surrogates, deep nesting, 5000-digit numbers, oversized
  frames. NUL inside chat text (REST and WebSocket) is answered and logged.

Each case ends with :func:`~tests.reliability._fuzz.assert_healthy`, on both databases.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect as ws_connect

from tests.reliability._fuzz import (
    ERROR_TYPES_4XX,
    MESSAGES,
    assert_healthy,
    auth,
    post_chat,
    until_terminal,
)

pytestmark = pytest.mark.usefixtures("fuzz_report")

WS_EXAMPLES = 30  # sockets, each with up to 6 frames


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**70),
    st.floats(),
    st.text(max_size=12),
)
_weird = st.one_of(
    _scalars,
    st.lists(_scalars, max_size=3),
    st.dictionaries(st.text(max_size=6), _scalars, max_size=3),
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "developer", "tool"]) | _weird,
        "content": st.text(max_size=40) | _weird,
    }
)
_chat = st.fixed_dictionaries(
    {"type": st.just("chat")},
    optional={
        "request_id": st.text(max_size=10) | _weird,
        "messages": st.just(MESSAGES) | st.lists(_message, max_size=3) | _weird,
        "model": st.sampled_from(["palmchat", "v1", "gpt-4o"]) | _weird,
        "max_tokens": st.integers(-2, 6) | _weird,
        "temperature": st.floats(-1, 3) | _weird,
        "top_p": st.floats(-0.5, 1.5) | _weird,
        "top_k": st.integers(-2, 2**40) | _weird,
        "n": st.integers(-1, 3) | _weird,
        "seed": _weird,
        "stop": st.lists(st.text(max_size=3), max_size=5) | _weird,
        "logprobs": st.booleans() | _weird,
        "top_logprobs": st.integers(-1, 25) | _weird,
        "presence_penalty": st.floats(-3, 3) | _weird,
        "conversation_id": st.text(max_size=40) | _weird,
        "stream": _weird,
    },
)
# near-valid chats: most of these generate, the rest hit one bound
_near_valid_chat = st.fixed_dictionaries(
    {"type": st.just("chat"), "messages": st.just(MESSAGES), "max_tokens": st.integers(1, 4)},
    optional={
        "request_id": st.text(max_size=10),
        "temperature": st.floats(0, 2.5),
        "top_p": st.floats(0, 1),
        "top_k": st.integers(0, 2**40),
        "n": st.integers(1, 3),
        "seed": st.integers(-(2**64), 2**64),
        "stop": st.lists(st.text(min_size=1, max_size=3), max_size=3),
        "logprobs": st.just(True),
        "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
    },
)
_feedback = st.fixed_dictionaries(
    {"type": st.just("feedback")},
    optional={
        "completion_id": st.text(max_size=40) | _weird,
        "choice_index": st.integers(-1, 3) | _weird,
        "rating": st.sampled_from([1, -1, 0, 2]) | _weird,
        "reason": st.text(max_size=20) | _weird,
    },
)
_other = st.fixed_dictionaries(
    {"type": st.sampled_from(["cancel", "auth", "ready", "delta", "done", "error"]) | _weird},
    optional={"request_id": _weird, "api_key": _weird},
)
# str payloads are sent as text frames, bytes as binary frames
ws_frames = st.one_of(
    (_chat | _near_valid_chat | _feedback | _other).map(json.dumps),
    _json.map(json.dumps),
    st.text(max_size=60),
    st.text(max_size=30).map(lambda s: "{" + s),
    st.binary(max_size=60),
)


def _check_error_frame(frame: dict[str, Any]) -> None:
    assert set(frame) <= {"type", "error", "request_id"}, frame
    assert set(frame["error"]) == {"message", "type", "param", "code"}, frame
    assert frame["error"]["type"] in ERROR_TYPES_4XX, frame  # never "api_error" (a 500)


def _good_chat(ws, request_id: str) -> None:
    ws.send(
        json.dumps(
            {"type": "chat", "request_id": request_id, "max_tokens": 2, "messages": MESSAGES}
        )
    )
    frame = until_terminal(ws)
    assert frame["type"] == "done" and frame["request_id"] == request_id, frame


@settings(
    max_examples=WS_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
@given(frames=st.lists(ws_frames, min_size=1, max_size=6))
def _fuzz_socket(server, frames: list[str | bytes]) -> None:
    with ws_connect(
        server.ws_url, additional_headers=auth(server.user_key), open_timeout=30, max_size=None
    ) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        for payload in frames:
            ws.send(payload)  # str: a text frame, bytes: a binary frame
            frame = until_terminal(ws)
            server.stats["ws_frames"] += 1
            server.stats[f"ws_{frame['type']}"] += 1
            if frame["type"] == "error":
                _check_error_frame(frame)
        _good_chat(ws, "after-fuzz")  # the same socket still serves
    server.stats["ws_sockets"] += 1


def test_fuzzed_websocket_frames_get_error_frames_and_the_socket_keeps_serving(
    fuzz_server,
) -> None:
    before = fuzz_server.stats.copy()
    _fuzz_socket(fuzz_server)
    assert fuzz_server.stats["ws_sockets"] - before["ws_sockets"] >= WS_EXAMPLES
    # the generator reached both the error paths and real generations
    assert fuzz_server.stats["ws_error"] > before["ws_error"]
    assert fuzz_server.stats["ws_done"] > before["ws_done"]
    assert_healthy(fuzz_server)


@pytest.mark.parametrize(
    "payload, why",
    [
        (b"\x00\xff\xfe binary", "binary frame"),
        ('{"type": "chat", "seed": ' + "9" * 5000 + "}", "integer past Python's digit limit"),
        ("[" * 5000 + "]" * 5000, "nesting past the recursion limit"),
        ('{"type": "chat", "messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
        (
            json.dumps({"type": "chat", "seed": 2**64, "messages": MESSAGES}),
            "seed >= 2**64",
        ),
        (
            json.dumps({"type": "chat", "conversation_id": "nope", "messages": MESSAGES}),
            "unknown conversation",
        ),
        ("x" * 300_000, "frame over 256 KiB"),
    ],
)
def test_nasty_websocket_frames_get_an_error_frame(fuzz_server, payload, why) -> None:
    with ws_connect(
        fuzz_server.ws_url, additional_headers=auth(fuzz_server.user_key), open_timeout=30
    ) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        ws.send(payload)
        frame = until_terminal(ws)
        assert frame["type"] == "error", (why, frame)
        _check_error_frame(frame)
        fuzz_server.stats["ws_frames"] += 1
        _good_chat(ws, "after")
    assert_healthy(fuzz_server)


def test_invalid_utf8_text_frame_and_giant_frame_close_only_that_socket(fuzz_server) -> None:
    # a text frame that is not UTF-8 is a protocol error (1007); one past uvicorn's 16 MiB
    # frame limit is 1009: the socket closes, the server does not notice otherwise
    for payload, codes in ((b'{"type": "\xff"}', {1007}), (b"x" * (17 * 2**20), {1009})):
        with ws_connect(
            fuzz_server.ws_url, additional_headers=auth(fuzz_server.user_key), open_timeout=30
        ) as ws:
            ws.recv(timeout=30)
            ws.send(payload, text=True)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                until_terminal(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code in codes
        fuzz_server.stats["ws_frames"] += 1
    # uvicorn reports the client's broken frame at ERROR level itself: not the app's error
    records = fuzz_server.errors.records
    records[:] = [r for r in records if "Invalid UTF-8" not in r.getMessage()]
    assert_healthy(fuzz_server)


def test_nul_characters_in_text_are_served_and_logged(fuzz_server) -> None:
    """NUL is valid JSON text, but PostgreSQL text cannot hold it: over REST and the WebSocket
    the chat is answered and its conversation logged, never a 5xx or a lost log entry."""
    content = "a\x00b<|end|>\x00"
    r = post_chat(fuzz_server, content)
    assert r.status_code == 200, r.text
    conversation_ids = [r.json()["conversation_id"]]
    with ws_connect(
        fuzz_server.ws_url, additional_headers=auth(fuzz_server.user_key), open_timeout=30
    ) as ws:
        ws.recv(timeout=30)
        ws.send(
            json.dumps(
                {
                    "type": "chat",
                    "max_tokens": 2,
                    "messages": [{"role": "user", "content": content}],
                }
            )
        )
        frame = until_terminal(ws)
        assert frame["type"] == "done", frame
        conversation_ids.append(frame["conversation_id"])
    for cid in conversation_ids:
        thread = httpx.get(
            f"{fuzz_server.url}/v1/conversations/{cid}", headers=auth(fuzz_server.user_key)
        )
        assert thread.status_code == 200, thread.text
        stored = thread.json()["messages"][0]["content"]
        assert stored in (content, content.replace("\x00", "\ufffd"))
    fuzz_server.stats["rest_abuse_cases"] += 1
    fuzz_server.stats["ws_frames"] += 1
    assert_healthy(fuzz_server)
