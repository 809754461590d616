"""Chat completions over real HTTP with the official openai SDK, httpx and SSE."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import openai
import pytest

from server.api.app import create_app
from shared.config import Settings
from tests.conftest import LiveServer, live_app

MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


def test_non_streaming_completion_reports_version_usage_and_is_logged(server, client) -> None:
    r = client.chat.completions.create(
        model="palmchat", messages=MESSAGES, max_tokens=8, temperature=0
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.system_fingerprint == "v1"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    convs = httpx.get(
        f"{server.url}/v1/conversations/{r.conversation_id}",
        headers={"Authorization": f"Bearer {server.key}"},
    ).json()
    answer = [m for m in convs["messages"] if m["role"] == "assistant"][0]
    assert answer["content"] == r.choices[0].message.content and answer["completion_id"] == r.id
    assert answer["policy_version"] == "v1"


def test_streaming_equals_non_streaming_for_greedy(client) -> None:
    full = client.chat.completions.create(
        model="palmchat", messages=MESSAGES, max_tokens=12, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="palmchat",
            messages=MESSAGES,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[
        0
    ].finish_reason


async def test_async_sdk_n3_with_logprobs(server) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0)
    r = await client.chat.completions.create(
        model="palmchat",
        messages=MESSAGES,
        max_tokens=6,
        n=3,
        seed=7,
        temperature=1.0,
        logprobs=True,
        top_logprobs=2,
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    for choice in r.choices:
        assert len(choice.logprobs.content) >= 1
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs.content)


def test_unknown_model_is_404_and_bad_params_are_400(client) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="palmchat", messages=MESSAGES, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="palmchat", messages=MESSAGES, max_tokens=10**9)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="palmchat", messages=[])


def test_models_lists_alias_and_active_version(client) -> None:
    assert [m.id for m in client.models.list()] == ["palmchat", "v1"]


def test_sse_stream_ends_with_done(server) -> None:
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        timeout=60,
        headers={"Authorization": f"Bearer {server.key}"},
        json={"model": "palmchat", "messages": MESSAGES, "max_tokens": 4, "stream": True},
    ) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert (
        first["object"] == "chat.completion.chunk"
        and first["choices"][0]["delta"]["role"] == "assistant"
    )


def test_metrics_change_after_traffic(server, client) -> None:
    def scrape() -> dict[str, float]:
        text = httpx.get(f"{server.url}/metrics").text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    before = scrape()
    client.chat.completions.create(model="palmchat", messages=MESSAGES, max_tokens=5, temperature=0)
    after = scrape()
    assert after["palmchat_generation_tokens_total"] > before.get(
        "palmchat_generation_tokens_total", 0
    )
    assert after["palmchat_time_to_first_token_seconds_count"] > before.get(
        "palmchat_time_to_first_token_seconds_count", 0
    )
    assert sum(v for k, v in after.items() if k.startswith("palmchat_requests_total")) > sum(
        v for k, v in before.items() if k.startswith("palmchat_requests_total")
    )
    assert after['palmchat_policy_info{version="v1"}'] == 1.0
    assert 0.0 <= after["palmchat_kv_cache_usage_perc"] <= 1.0
    # 16 candidates decode 16 rows a step: the engine times those steps on one thread against
    # every core and reports what it chose
    client.chat.completions.create(
        model="palmchat",
        messages=MESSAGES,
        max_tokens=24,
        n=16,
        extra_body={"ignore_eos": True},
    )
    cores = len(os.sched_getaffinity(0))  # the engine's threads by default
    threads = scrape().get('palmchat_decode_threads{rows="16-31"}')
    assert threads in ((1.0, float(cores)) if cores > 1 else (None,))  # 1 core: nothing to time


def test_conversation_id_continues_the_thread(server, client) -> None:
    first = client.chat.completions.create(
        model="palmchat", messages=MESSAGES, max_tokens=4, temperature=0
    )
    follow = [
        *MESSAGES,
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And double that?"},
    ]
    second = client.chat.completions.create(
        model="palmchat",
        messages=follow,
        max_tokens=4,
        temperature=0,
        extra_body={"conversation_id": first.conversation_id},
    )
    assert second.conversation_id == first.conversation_id
    thread = httpx.get(
        f"{server.url}/v1/conversations/{first.conversation_id}",
        headers={"Authorization": f"Bearer {server.key}"},
    ).json()
    roles = [m["role"] for m in thread["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    by_id = {m["id"]: m for m in thread["messages"]}
    last = thread["messages"][-1]
    assert by_id[by_id[last["parent_id"]]["parent_id"]]["completion_id"] == first.id


def test_auth_can_be_turned_off_only_on_loopback(tmp_path: Path, tiny_seed_dir: Path) -> None:
    with pytest.raises(ValueError, match="loopback"):
        create_app(Settings(data_dir=tmp_path, host="0.0.0.0"), auth=False, seed_dir=tiny_seed_dir)
    app = create_app(
        Settings(data_dir=tmp_path, host="127.0.0.1"), auth=False, seed_dir=tiny_seed_dir
    )
    with LiveServer(app) as live:
        assert httpx.get(f"{live.url}/v1/models").status_code == 200
        r = httpx.post(
            f"{live.url}/v1/chat/completions",
            timeout=60,
            json={"model": "palmchat", "messages": MESSAGES, "max_tokens": 3},
        )
        assert r.status_code == 200
        convs = httpx.get(f"{live.url}/v1/conversations").json()["data"]
        assert convs and convs[0]["id"] == r.json()["conversation_id"]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.mark.parametrize(
    "params, param",
    [
        ({"tools": [WEATHER_TOOL], "tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER_TOOL]}, "tools"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"extra_body": {"frobnicate": True}}, "frobnicate"),
    ],
)
def test_a_parameter_palmchat_cannot_honour_is_a_400_naming_it(client, params, param) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="palmchat", messages=MESSAGES, max_tokens=4, **params)
    assert e.value.body["param"] == param, e.value.body
    assert e.value.body["code"] in ("unsupported_parameter", "unknown_parameter")


def test_parameters_that_change_nothing_generated_are_accepted(client) -> None:
    r = client.chat.completions.create(
        model="palmchat",
        messages=MESSAGES,
        max_tokens=4,
        metadata={"team": "qa"},
        store=True,
        tools=[WEATHER_TOOL],
        tool_choice="none",
        response_format={"type": "text"},
    )
    assert r.choices[0].finish_reason in ("stop", "length")


def test_logit_bias_and_vllm_sampling_extras_reach_the_engine(server, client) -> None:
    tok = server.state.engine.tokenizer
    [a] = tok.encode("A")
    forced = client.chat.completions.create(
        model="palmchat",
        messages=MESSAGES,
        max_tokens=3,
        temperature=1.0,
        logit_bias={str(a): 100},
    )
    assert forced.choices[0].message.content == "AAA"
    long = client.chat.completions.create(
        model="palmchat",
        messages=MESSAGES,
        max_tokens=9,
        temperature=0,
        extra_body={"min_tokens": 9, "repetition_penalty": 1.3, "min_p": 0.05},
    )
    assert long.usage.completion_tokens == 9
    for bad, param in (
        ({"logit_bias": {str(tok.vocab_size + 5): 1}}, "logit_bias"),
        ({"extra_body": {"stop_token_ids": [tok.vocab_size]}}, "stop_token_ids"),
        ({"logit_bias": {"A": 1}}, "logit_bias"),
        ({"extra_body": {"min_tokens": 10}}, None),  # more than max_tokens
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="palmchat", messages=MESSAGES, max_tokens=4, **bad)
        if param is not None:
            assert e.value.body["param"] == param, e.value.body


def test_malformed_json_and_empty_messages_get_clear_400s(server) -> None:
    headers = {"Authorization": f"Bearer {server.key}", "content-type": "application/json"}
    url = f"{server.url}/v1/chat/completions"
    truncated = httpx.post(url, content=b'{"model": "palmchat", "mess', headers=headers)
    assert truncated.status_code == 400
    error = truncated.json()["error"]
    assert error["code"] == "invalid_json" and error["param"] is None
    assert "JSON" in error["message"] and "character" in error["message"]
    for content in (None, "", []):
        body = {"model": "palmchat", "messages": [{"role": "user", "content": content}]}
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == 400, (content, r.text)
        assert r.json()["error"]["param"] == "messages.0.content"
    # an empty answer in the history is fine (the model may have given one)
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "again?"},
    ]
    r = httpx.post(
        url, json={"model": "palmchat", "messages": history, "max_tokens": 2}, headers=headers
    )
    assert r.status_code == 200, r.text


def test_a_stopped_server_closes_its_engine_and_its_spool(tmp_path: Path, tiny_seed_dir: Path):
    """A graceful stop waits for the log writes in flight, stops the write spool's replay and
    closes the engine it started (with the bundled moderation classifier, the default)."""
    with live_app(tmp_path, tiny_seed_dir, kv_cache_memory_mb=16, user="erin") as live:
        state = live.state
        httpx.post(
            f"{live.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {live.key}"},
            json={"model": "palmchat", "messages": [{"role": "user", "content": "hi"}],
                  "max_tokens": 2},
            timeout=60,
        ).raise_for_status()  # fmt: skip
        assert state.engine is not None and state.spool is not None and state.spool.running
    assert state.engine is None and not state.spool.running


async def test_concurrent_requests_each_get_their_own_keys_answer(server) -> None:
    """Keys of concurrent requests are looked up together: each request still gets the
    answer for its own key (a live key of either user, a revoked one, an unknown one), and
    each user's chats are logged as theirs."""
    import asyncio

    from shared.keys import create_key, revoke_key

    db = server.state.db
    bob = create_key(db, "bob")
    revoked = create_key(db, "mallory")
    assert revoke_key(db, revoked[:8]) == 1
    keys = [server.key, bob, revoked, "pc-unknown-key", server.key, bob] * 4
    body = {"model": "palmchat", "max_tokens": 2, "temperature": 0}

    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:

        async def chat(i: int, key: str) -> tuple[int, str | None]:
            r = await http.post(
                "/v1/chat/completions",
                json=body | {"messages": [{"role": "user", "content": f"chat {i}"}]},
                headers={"Authorization": f"Bearer {key}"},
            )
            if r.status_code != 200:
                return r.status_code, r.json()["error"]["code"]
            conv = r.json()["conversation_id"]
            log = await http.get(
                f"/v1/conversations/{conv}", headers={"Authorization": f"Bearer {key}"}
            )
            return log.status_code, log.json()["messages"][0]["content"]

        results = await asyncio.gather(*(chat(i, k) for i, k in enumerate(keys)))
    for i, (key, result) in enumerate(zip(keys, results, strict=True)):
        if key in (server.key, bob):
            assert result == (200, f"chat {i}")
        else:
            assert result == (401, "invalid_api_key")
