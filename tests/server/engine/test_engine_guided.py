"""Grammar-constrained decoding in the engine: every constrained candidate's text is valid for
its grammar (a JSON schema, any JSON object, a regex, a choice), constrained and plain rows
share a batch without touching each other, and a grammar that cannot compile is refused before
anything is queued."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from server.engine import FinishReason, GrammarError, GuidedDecoding, SamplingParams

PROMPT = [72, 101, 108, 108, 111, 32, 116, 104, 101, 114, 101]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "owl"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}


def test_every_sampled_answer_parses_and_validates_against_the_schema(make_engine) -> None:
    engine = make_engine()
    guided = GuidedDecoding("json_schema", json.dumps(SCHEMA))
    params = SamplingParams(temperature=1.0, n=10, max_tokens=120, seed=7, guided=guided)
    candidates = [c for req in engine.generate([PROMPT] * 5, params) for c in req]
    assert len(candidates) == 50
    for c in candidates:
        assert c.finish_reason is FinishReason.STOP, c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)
    assert len({c.text for c in candidates}) > 5  # sampled, not one forced string


def test_json_object_regex_and_choice(make_engine) -> None:
    engine = make_engine()
    bounded = GuidedDecoding("json_object")
    obj = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=200, guided=bounded))[
        0
    ][0]
    if obj.finish_reason is FinishReason.STOP:
        assert isinstance(json.loads(obj.text), dict)
    else:  # cut at max_tokens, as OpenAI's: a prefix of an object
        assert obj.text.startswith("{")
    pattern = r"[a-c]{3}-\d{2}"
    regex = SamplingParams(
        temperature=1.0, n=8, seed=1, max_tokens=20, guided=GuidedDecoding("regex", pattern)
    )
    for c in engine.generate([PROMPT], regex)[0]:
        assert re.fullmatch(pattern, c.text), c.text
    choices = ["yes", "no", "maybe so"]
    pick = SamplingParams(
        temperature=1.0, n=8, seed=2, max_tokens=20,
        guided=GuidedDecoding("choice", json.dumps(choices)),
    )  # fmt: skip
    picked = {c.text for c in engine.generate([PROMPT], pick)[0]}
    assert picked <= set(choices) and picked


def test_digit_and_word_shorthands_mean_ascii_in_regexes_and_schema_patterns(make_engine) -> None:
    engine = make_engine()
    regex = GuidedDecoding("regex", r"\d{3}-\w{2}")
    schema = {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^\\d{4}$"}},
        "required": ["code"],
        "additionalProperties": False,
    }
    for guided in (regex, GuidedDecoding("json_schema", json.dumps(schema))):
        params = SamplingParams(temperature=1.0, n=16, seed=5, max_tokens=40, guided=guided)
        for c in engine.generate([PROMPT], params)[0]:
            text = c.text if guided.kind == "regex" else json.loads(c.text)["code"]
            # re.ASCII: Python's own \d and \w would also take any Unicode digit or letter
            full = r"\d{3}-\w{2}" if guided.kind == "regex" else r"\d{4}"
            assert re.fullmatch(full, text, re.ASCII), c.text


def test_constrained_and_plain_rows_share_a_batch(make_engine) -> None:
    engine = make_engine()
    plain = SamplingParams(temperature=0, max_tokens=15, ignore_eos=True)
    alone = engine.generate([PROMPT], plain)[0][0].token_ids
    guided = SamplingParams(
        temperature=0, max_tokens=60, guided=GuidedDecoding("json_schema", json.dumps(SCHEMA))
    )
    both = engine.generate([PROMPT, PROMPT, PROMPT], [plain, guided, plain])
    assert both[0][0].token_ids == alone and both[2][0].token_ids == alone
    jsonschema.validate(json.loads(both[1][0].text), SCHEMA)


@pytest.mark.parametrize(
    "kind, spec",
    [("json_schema", "{not json"), ("json_schema", "[1]"), ("regex", "(("), ("choice", "[]")],
)
def test_a_grammar_that_cannot_compile_is_refused_before_queueing(make_engine, kind, spec) -> None:
    engine = make_engine()
    with pytest.raises(GrammarError):
        engine.add_request(PROMPT, SamplingParams(guided=GuidedDecoding(kind, spec)))
    assert not engine.has_work()
    with pytest.raises(GrammarError):
        GuidedDecoding("xml")


def test_guided_params_survive_the_triton_wire() -> None:
    from server.triton.protocol import params_from_json, params_to_json

    params = SamplingParams(guided=GuidedDecoding("regex", "a+"))
    assert params_from_json(params_to_json(params)) == params


def test_the_guided_benchmark_compares_equal_token_counts(tmp_path) -> None:
    from bench.guided import run_guided_benchmark

    results = run_guided_benchmark(batch=2, new_tokens=9, repeats=1, out_dir=tmp_path)
    assert results["every_output_valid"] == {"json_schema": True, "regex": True}
    assert results["tokens_per_row"] == 9
    assert set(results["constrained_vs_unconstrained"]) == {"json_schema", "regex"}
    saved = json.loads((tmp_path / "guided-latest.json").read_text())
    assert saved["tokens_per_s_median"]["unconstrained"] > 0
