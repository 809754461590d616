"""Structured outputs through the API with the official SDK: response_format json_object and
json_schema (strict), vLLM's guided_choice/guided_regex, all enforced by constrained decoding:
every sampled answer parses and validates. A schema that cannot compile is a 400."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.conftest import live_app

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "celsius": {"type": "integer", "minimum": -40, "maximum": 50},
        "sky": {"enum": ["clear", "cloudy", "rain"]},
    },
    "required": ["city", "celsius", "sky"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe the weather in Paris as JSON."}]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_seed_dir: Path):
    structured = tmp_path_factory.mktemp("structured")
    with live_app(structured, tiny_seed_dir, user="alice", kv_cache_memory_mb=16) as live:
        yield openai.OpenAI(base_url=f"{live.url}/v1", api_key=live.key, max_retries=0)


def test_fifty_sampled_json_schema_answers_all_parse_and_validate(client) -> None:
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True},
    }
    answers = []
    for seed in range(5):
        r = client.chat.completions.create(
            model="palmchat", messages=MESSAGES, n=10, temperature=1.0, seed=seed,
            max_tokens=120, response_format=fmt,
        )  # fmt: skip
        answers += [c.message.content for c in r.choices]
        assert all(c.finish_reason == "stop" for c in r.choices)
    assert len(answers) == 50
    for text in answers:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_gives_an_object(client) -> None:
    r = client.chat.completions.create(
        model="palmchat", messages=MESSAGES, temperature=0, max_tokens=200,
        response_format={"type": "json_object"},
    )  # fmt: skip
    choice = r.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # cut at max_tokens: what there is of an object
        assert choice.message.content.startswith("{")


def test_streamed_structured_output_is_the_same_json(client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}}
    whole = (
        client.chat.completions.create(
            model="palmchat", messages=MESSAGES, temperature=0, max_tokens=120, response_format=fmt
        )
        .choices[0]
        .message.content
    )
    stream = client.chat.completions.create(
        model="palmchat", messages=MESSAGES, temperature=0, max_tokens=120,
        response_format=fmt, stream=True,
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == whole
    jsonschema.validate(json.loads(text), SCHEMA)


def test_vllm_guided_choice_and_regex(client) -> None:
    r = client.chat.completions.create(
        model="palmchat", messages=MESSAGES, n=6, temperature=1.0, seed=3, max_tokens=10,
        extra_body={"guided_choice": ["sunny", "rainy"]},
    )  # fmt: skip
    assert {c.message.content for c in r.choices} <= {"sunny", "rainy"}
    r = client.chat.completions.create(
        model="palmchat", messages=MESSAGES, n=6, temperature=1.0, seed=4, max_tokens=12,
        extra_body={"guided_regex": r"\d{2}:\d{2}"},
    )  # fmt: skip
    # ASCII digits, as vLLM and JSON Schema read \d (not any Unicode digit)
    assert all(re.fullmatch(r"\d{2}:\d{2}", c.message.content, re.ASCII) for c in r.choices)


@pytest.mark.parametrize(
    "params, param",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "frob"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"extra_body": {"guided_regex": "(("}}, "guided_regex"),
        ({"extra_body": {"guided_choice": ["a"], "guided_regex": "a"}}, None),
    ],
)
def test_a_format_that_cannot_be_enforced_is_a_400(client, params, param) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="palmchat", messages=MESSAGES, max_tokens=5, **params)
    if param is not None:
        assert e.value.body["param"] == param, e.value.body
