"""The conversation log records exactly what the model saw: for every way of continuing a
conversation (REST, SSE, WebSocket, regenerate, compare, an edited history), the logged path
from the root to the reply, rendered with the chat template, is the prompt the engine was
given, and the exports pair the reply with that same prompt."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
import websockets

from shared.feedback_reader import export_kto
from shared.keys import create_key
from shared.tokenizer import apply_chat_template

FIRST = [{"role": "user", "content": "What is 7 + 5?"}]
NEXT = {"role": "user", "content": "And double that?"}


def _thread(server, conversation_id: str) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{server.url}/v1/conversations/{conversation_id}",
        headers={"Authorization": f"Bearer {server.key}"},
    )
    assert r.status_code == 200, r.text
    return r.json()["messages"]


def logged_prompt(server, conversation_id: str, completion_id: str, index: int = 0) -> list[dict]:
    """The stored path from the root to the reply's parent: the prompt the log says it had."""
    by_id = {m["id"]: m for m in _thread(server, conversation_id)}
    reply = next(
        m
        for m in by_id.values()
        if m["completion_id"] == completion_id and m["choice_index"] == index
    )
    path = []
    node = by_id.get(reply["parent_id"])
    while node is not None:
        path.append({"role": node["role"], "content": node["content"]})
        node = by_id.get(node["parent_id"])
    return path[::-1]


def assert_logged_as_seen(server, conversation_id: str, completion_id: str, prompt_tokens: int):
    """The logged path, tokenised with the chat template, is as long as the prompt the engine
    reported in ``usage``; returns that path."""
    path = logged_prompt(server, conversation_id, completion_id)
    tok = server.state.engine.tokenizer
    assert len(apply_chat_template(tok, path, add_generation_prompt=True)) == prompt_tokens, path
    return path


def _continue(client, messages: list[dict], conversation_id: str) -> Any:
    """A greedy six-token answer to ``messages`` as a continuation of that conversation."""
    return client.chat.completions.create(
        model="palmchat",
        messages=messages,
        max_tokens=6,
        temperature=0,
        extra_body={"conversation_id": conversation_id},
    )


def _start(client) -> tuple[Any, list[dict]]:
    first = client.chat.completions.create(
        model="palmchat", messages=FIRST, max_tokens=6, temperature=0
    )
    answer = {"role": "assistant", "content": first.choices[0].message.content}
    return first, [*FIRST, answer]


def test_only_the_new_message_is_generated_from_the_whole_conversation(server, client) -> None:
    first, history = _start(client)
    alone = client.chat.completions.create(
        model="palmchat", messages=[NEXT], max_tokens=6, temperature=0
    )
    second = _continue(client, [NEXT], first.conversation_id)
    # the model saw the earlier turns, not the one message on its own
    assert second.usage.prompt_tokens > alone.usage.prompt_tokens
    path = assert_logged_as_seen(
        server, first.conversation_id, second.id, second.usage.prompt_tokens
    )
    assert path == [*history, NEXT]
    # the same answer as when the client sends the whole history itself
    full = client.chat.completions.create(
        model="palmchat", messages=[*history, NEXT], max_tokens=6, temperature=0
    )
    assert full.usage.prompt_tokens == second.usage.prompt_tokens
    assert full.choices[0].message.content == second.choices[0].message.content


def test_a_streamed_continuation_is_logged_as_it_was_generated(server, client) -> None:
    first, history = _start(client)
    chunks = list(
        client.chat.completions.create(
            model="palmchat",
            messages=[NEXT],
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"conversation_id": first.conversation_id},
        )
    )
    usage = chunks[-1].usage
    path = assert_logged_as_seen(server, first.conversation_id, chunks[0].id, usage.prompt_tokens)
    assert path == [*history, NEXT]


async def test_a_websocket_continuation_is_logged_as_it_was_generated(server, client) -> None:
    first, history = _start(client)
    url = server.url.replace("http", "ws") + f"/v1/chat/ws?api_key={server.key}"
    async with websockets.connect(url) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        frame = {
            "type": "chat",
            "request_id": "r1",
            "max_tokens": 6,
            "temperature": 0,
            "messages": [NEXT],
            "conversation_id": first.conversation_id,
        }
        await ws.send(json.dumps(frame))
        while (done := json.loads(await ws.recv()))["type"] not in ("done", "error"):
            pass
    assert done["type"] == "done", done
    assert done["conversation_id"] == first.conversation_id
    prompt_tokens = done["usage"]["prompt_tokens"]
    path = assert_logged_as_seen(
        server, first.conversation_id, done["completion_id"], prompt_tokens
    )
    assert path == [*history, NEXT]


def test_regenerate_and_compare_keep_their_prompts(server, client) -> None:
    first, history = _start(client)
    conv = first.conversation_id
    follow = [*history, NEXT]
    answer = client.chat.completions.create(
        model="palmchat", messages=follow, max_tokens=6, temperature=0,
        extra_body={"conversation_id": conv},
    )  # fmt: skip
    # regenerate that answer (the same history again): a sibling under the same prompt
    again = client.chat.completions.create(
        model="palmchat", messages=follow, max_tokens=6, temperature=1.0, seed=3,
        extra_body={"conversation_id": conv},
    )  # fmt: skip
    assert assert_logged_as_seen(server, conv, again.id, again.usage.prompt_tokens) == follow
    by_id = {m["id"]: m for m in _thread(server, conv)}
    parents = {
        m["parent_id"] for m in by_id.values() if m["completion_id"] in (answer.id, again.id)
    }
    assert len(parents) == 1
    # compare mode (n=2): both answers under the prompt they were generated from
    both = client.chat.completions.create(
        model="palmchat", messages=follow, max_tokens=6, n=2, temperature=1.0, seed=4,
        extra_body={"conversation_id": conv},
    )  # fmt: skip
    for index in (0, 1):
        assert logged_prompt(server, conv, both.id, index) == follow
    assert_logged_as_seen(server, conv, both.id, both.usage.prompt_tokens)
    # a prompt with no assistant message is a new turn, even when it repeats an earlier one
    repeat = client.chat.completions.create(
        model="palmchat", messages=FIRST, max_tokens=6, temperature=0,
        extra_body={"conversation_id": conv},
    )  # fmt: skip
    path = assert_logged_as_seen(server, conv, repeat.id, repeat.usage.prompt_tokens)
    assert path[-1] == FIRST[0] and len(path) > 1


def test_an_edited_history_is_logged_as_the_branch_it_is(server, client) -> None:
    first, _ = _start(client)
    edited = [*FIRST, {"role": "assistant", "content": "It is 12."}, NEXT]
    r = _continue(client, edited, first.conversation_id)
    path = assert_logged_as_seen(server, first.conversation_id, r.id, r.usage.prompt_tokens)
    assert path == edited


def test_the_export_pairs_a_continued_reply_with_the_prompt_it_had(server, client) -> None:
    first, history = _start(client)
    second = _continue(
        client, [{"role": "user", "content": "Now triple it."}], first.conversation_id
    )
    r = httpx.post(
        f"{server.url}/v1/feedback",
        headers={"Authorization": f"Bearer {server.key}"},
        json={"completion_id": second.id, "choice_index": 0, "rating": -1},
    )
    assert r.status_code == 200, r.text
    reply = second.choices[0].message.content
    rows = [row for row in export_kto(server.state.db) if row["completion"][0]["content"] == reply]
    prompts = [row["prompt"] for row in rows]
    assert [*history, {"role": "user", "content": "Now triple it."}] in prompts


def test_continuing_someone_elses_or_a_missing_conversation_is_404(server, client) -> None:
    first, _ = _start(client)
    bob = openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=create_key(server.state.db, "bob"), max_retries=0
    )
    for who, conv in ((bob, first.conversation_id), (client, "no-such-conversation")):
        with pytest.raises(openai.NotFoundError) as e:
            who.chat.completions.create(
                model="palmchat",
                messages=[NEXT],
                max_tokens=4,
                extra_body={"conversation_id": conv},
            )
        assert e.value.body["param"] == "conversation_id"
