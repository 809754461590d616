"""Legacy text completions (``POST /v1/completions``) over real HTTP, with the official openai
SDK's ``client.completions.create`` as the client."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import live_app, ok_or_429

PROMPT = "The capital of France is"


def greedy(client: openai.OpenAI, prompt, *, ignore_eos: bool = False, **params):
    """A greedy completion; ``ignore_eos`` (vLLM's) goes in the SDK's ``extra_body``."""
    if ignore_eos:
        params["extra_body"] = {**params.get("extra_body", {}), "ignore_eos": True}
    return client.completions.create(model="palmchat", prompt=prompt, temperature=0, **params)


def token_ids(server, text: str) -> list[int]:
    r = httpx.post(f"{server.url}/tokenize", headers=server.auth, json={"prompt": text})
    return r.json()["tokens"]


def collect(stream) -> tuple[dict[int, str], dict[int, str | None], list]:
    """Text and finish reason per choice index of a streamed completion, and its chunks."""
    chunks = list(stream)
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    for chunk in chunks:
        assert chunk.object == "text_completion"
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
    return texts, reasons, chunks


def test_non_streaming_and_streaming_give_the_same_greedy_text(server, client) -> None:
    full = greedy(client, PROMPT, max_tokens=12)
    assert full.object == "text_completion" and full.id.startswith("cmpl-")
    assert full.model == "palmchat" and full.system_fingerprint == "v1"
    [choice] = full.choices
    assert choice.index == 0 and choice.logprobs is None
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens == len(token_ids(server, PROMPT))
    assert 1 <= full.usage.completion_tokens <= 12

    texts, reasons, chunks = collect(
        greedy(client, PROMPT, max_tokens=12, stream=True, stream_options={"include_usage": True})
    )
    assert texts == {0: choice.text} and reasons == {0: choice.finish_reason}
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("cmpl-")


def test_sse_is_text_completion_chunks_ending_with_done(server) -> None:
    with httpx.stream(
        "POST",
        f"{server.url}/v1/completions",
        headers=server.auth,
        timeout=60,
        json={"model": "palmchat", "prompt": PROMPT, "max_tokens": 4, "stream": True},
    ) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 2
    assert all('"object":"text_completion"' in line for line in lines[:-1])


def test_n_and_a_list_of_prompts_give_prompt_major_choices(client) -> None:
    prompts = ["One, two,", "Hello"]
    alone = [greedy(client, p, max_tokens=6, echo=True).choices[0].text for p in prompts]
    assert all(text.startswith(p) for text, p in zip(alone, prompts, strict=True))

    r = greedy(client, prompts, n=2, max_tokens=6, echo=True)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    # index = prompt_i * n + j: the first prompt's two choices, then the second's
    assert [c.text for c in r.choices] == [alone[0], alone[0], alone[1], alone[1]]
    assert r.usage.completion_tokens == sum(
        greedy(client, p, max_tokens=6).usage.completion_tokens for p in prompts for _ in (0, 1)
    )

    texts, _, _ = collect(greedy(client, prompts, n=2, max_tokens=6, echo=True, stream=True))
    assert texts == {c.index: c.text for c in r.choices}


def test_seeded_sampling_gives_distinct_reproducible_choices(client) -> None:
    def sample():
        return client.completions.create(
            model="palmchat", prompt=PROMPT, n=3, seed=11, temperature=1.0, max_tokens=8
        )

    first, again = sample(), sample()
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1


def test_echo_prepends_the_prompt(client) -> None:
    plain = greedy(client, PROMPT, max_tokens=8).choices[0].text
    echoed = greedy(client, PROMPT, max_tokens=8, echo=True)
    assert echoed.choices[0].text == PROMPT + plain
    # the prompt counts as prompt tokens only
    assert (
        echoed.usage.completion_tokens
        == greedy(client, PROMPT, max_tokens=8).usage.completion_tokens
    )


def check_logprobs(lp, text: str, top: int) -> None:
    size = len(lp.tokens)
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == size
    assert lp.text_offset == sorted(lp.text_offset) and all(
        0 <= o <= len(text) for o in lp.text_offset
    )
    for token, value, alternatives in zip(
        lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True
    ):
        assert value <= 0
        # the `top` most likely tokens, and the chosen one among them or added
        assert top <= len(alternatives) <= top + 1 and alternatives[token] == value
        assert all(v <= 0 for v in alternatives.values())


def test_logprobs_have_openais_shape(client) -> None:
    r = greedy(client, PROMPT, max_tokens=10, logprobs=3, ignore_eos=True)
    choice = r.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == r.usage.completion_tokens == 10
    check_logprobs(lp, choice.text, 3)
    # greedy: the chosen token is the most likely one
    assert all(
        value == max(alternatives.values())
        for value, alternatives in zip(lp.token_logprobs, lp.top_logprobs, strict=True)
    )
    assert lp.text_offset[0] == 0
    # each token's text sits at its offset (tokens that are partial UTF-8 show as bytes:)
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        if not token.startswith("bytes:") and not token.startswith("<|"):
            assert choice.text[offset : offset + len(token)] == token

    zero = greedy(client, PROMPT, max_tokens=4, logprobs=0).choices[0].logprobs
    assert all(len(alternatives) == 1 for alternatives in zero.top_logprobs)


def test_streamed_logprobs_add_up_to_the_full_ones(client) -> None:
    full = greedy(client, PROMPT, max_tokens=10, logprobs=2, ignore_eos=True).choices[0].logprobs
    chunks = list(greedy(client, PROMPT, max_tokens=10, logprobs=2, ignore_eos=True, stream=True))
    parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == full.tokens
    assert [o for p in parts for o in p.text_offset] == full.text_offset
    assert [v for p in parts for v in p.token_logprobs] == pytest.approx(full.token_logprobs)


def test_echo_with_logprobs_lists_the_prompt_tokens_with_null_logprobs(server, client) -> None:
    prompt_ids = token_ids(server, PROMPT)
    r = greedy(client, PROMPT, max_tokens=5, logprobs=1, echo=True, ignore_eos=True)
    lp = r.choices[0].logprobs
    head = len(prompt_ids)
    assert len(lp.tokens) == head + 5
    assert "".join(lp.tokens[:head]) == PROMPT
    assert lp.token_logprobs[:head] == [None] * head and lp.top_logprobs[:head] == [None] * head
    assert lp.text_offset[0] == 0 and lp.text_offset[head] == len(PROMPT)
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[head:])


def test_max_tokens_defaults_to_16(client) -> None:
    r = greedy(client, PROMPT, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_stop_ends_the_text_before_the_stop_string(client) -> None:
    text = greedy(client, PROMPT, max_tokens=16, ignore_eos=True).choices[0].text
    stop = next(
        text[i : i + 2]
        for i in range(2, len(text) - 1)
        if "\ufffd" not in text[i : i + 2] and text[i : i + 2].strip()
    )
    r = greedy(client, PROMPT, max_tokens=16, ignore_eos=True, stop=[stop])
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_a_token_id_prompt_gives_the_same_text_as_its_string(server, client) -> None:
    ids = token_ids(server, PROMPT)
    by_text = greedy(client, PROMPT, max_tokens=10)
    by_ids = greedy(client, ids, max_tokens=10)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage == by_text.usage
    # echo gives the ids back as text; a list of id lists is a list of prompts
    assert greedy(client, ids, max_tokens=1, echo=True).choices[0].text.startswith(PROMPT)
    both = greedy(client, [ids, ids], max_tokens=10)
    assert [c.text for c in both.choices] == [by_text.choices[0].text] * 2


def error_of(call) -> dict:
    with pytest.raises(openai.BadRequestError) as e:
        call()
    assert e.value.status_code == 400
    return e.value.body


def test_parameters_palmchat_cannot_honour_are_400s_naming_them(client) -> None:
    body = error_of(lambda: greedy(client, PROMPT, suffix=" and that is all."))
    assert body["param"] == "suffix" and "suffix" in body["message"]
    body = error_of(lambda: greedy(client, PROMPT, n=1, best_of=3))
    assert body["param"] == "best_of"
    body = error_of(lambda: greedy(client, PROMPT, extra_body={"frobnicate": True}))
    assert body["message"] == "Unrecognized request argument supplied: frobnicate"
    assert body["param"] == "frobnicate"
    # best_of equal to n asks for nothing palmchat does not do
    assert greedy(client, PROMPT, n=2, best_of=2, max_tokens=2).choices[1].index == 1


def test_bad_prompts_are_400s_naming_the_prompt(server, client) -> None:
    body = error_of(lambda: greedy(client, [5, 10**6]))
    assert body["param"] == "prompt" and "vocabulary" in body["message"]
    body = error_of(lambda: greedy(client, [[5], [-1]]))
    assert body["param"] == "prompt" and "prompt[1]" in body["message"]
    for empty in ("", [], [""], [[]]):
        assert error_of(lambda empty=empty: greedy(client, empty))["param"] == "prompt"
    r = httpx.post(
        f"{server.url}/v1/completions",
        headers=server.auth,
        json={"model": "palmchat", "prompt": [1, "two"]},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt=PROMPT)
    assert e.value.body["code"] == "model_not_found"


def test_prompt_and_max_tokens_beyond_the_context_are_400s(server, client) -> None:
    context = server.state.engine.max_seq_len
    size = len(token_ids(server, PROMPT))
    body = error_of(lambda: greedy(client, PROMPT, max_tokens=context - size + 1))
    assert body["code"] == "context_length_exceeded" and body["param"] == "max_tokens"
    body = error_of(lambda: greedy(client, [5] * context))
    assert body["code"] == "context_length_exceeded" and body["param"] == "prompt"
    # exactly the context is fine; null max_tokens takes what the prompt leaves
    r = greedy(client, PROMPT, max_tokens=context - size, ignore_eos=True)
    assert r.usage.total_tokens == context
    r = greedy(client, PROMPT, max_tokens=None, ignore_eos=True)
    assert r.usage.total_tokens == context


def test_text_completions_are_not_logged_but_are_counted(server, client) -> None:
    def scrape() -> dict[str, float]:
        values = {}
        for line in httpx.get(f"{server.url}/metrics").text.splitlines():
            if line.startswith(("palmchat_requests_total{", "palmchat_request_success_total{")):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    ok = 'palmchat_requests_total{code="",endpoint="/v1/completions",status="2xx"}'
    refused = (
        'palmchat_requests_total{code="unknown_parameter",endpoint="/v1/completions",status="4xx"}'
    )
    before = scrape()
    greedy(client, [PROMPT, "Hello"], n=2, max_tokens=3)
    error_of(lambda: greedy(client, PROMPT, extra_body={"frobnicate": 1}))
    deadline = time.monotonic() + 10
    while True:  # a request is counted once its response has gone out
        after = scrape()
        done = [after.get(k, 0) - before.get(k, 0) for k in (ok, refused)]
        if done == [1, 1] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert done == [1, 1]
    # each of the two prompts' two choices has its finish reason counted
    finished = sum(
        after[k] - before.get(k, 0) for k in after if k.startswith("palmchat_request_success")
    )
    assert finished == 4
    listed = httpx.get(f"{server.url}/v1/conversations", headers=server.auth).json()
    assert listed["data"] == []


def test_a_client_that_leaves_mid_stream_cancels_every_prompts_request(server) -> None:
    engine = server.state.engine
    cancelled = engine.stats().requests_cancelled
    with httpx.stream(
        "POST",
        f"{server.url}/v1/completions",
        headers=server.auth,
        timeout=60,
        json={
            "model": "palmchat",
            "prompt": [PROMPT, "Hello"],
            "max_tokens": 200,
            "ignore_eos": True,
            "stream": True,
        },
    ) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith("data: "))
    deadline = time.monotonic() + 30
    while engine.stats().requests_cancelled < cancelled + 2 or engine.stats().running:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.05)


async def test_a_full_queue_is_a_429_with_retry_after(tmp_path: Path, tiny_seed_dir: Path) -> None:
    small = dict(kv_cache_memory_mb=1, max_waiting=2)
    with live_app(tmp_path, tiny_seed_dir, user="alice", **small) as live:
        client = openai.AsyncOpenAI(
            base_url=f"{live.url}/v1", api_key=live.key, max_retries=0, timeout=120
        )

        async def one(stream: bool) -> None:
            r = await client.completions.create(
                model="palmchat", prompt=[PROMPT, "Hello"], max_tokens=60, seed=1, stream=stream
            )
            if stream:
                async for _ in r:
                    pass

        codes = await asyncio.gather(*[ok_or_429(one(stream=i % 2 == 1)) for i in range(24)])
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        after = await client.completions.create(model="palmchat", prompt=PROMPT, max_tokens=3)
        assert after.choices[0].finish_reason in ("stop", "length")
        stats = live.state.engine.stats()
        assert stats.running == 0 and stats.waiting == 0
