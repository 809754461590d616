"""Sampling parameters as a client sees them: validation, stop strings, n, logprobs,
max_tokens, penalties, top-k/top-p."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy_reference

from server.engine import FinishReason, SamplingParams
from server.engine.outputs import TextState
from server.engine.sampling import sample_rows
from shared.tokenizer import BPETokenizer, ByteTokenizer

END = 260
PROMPT = [72, 101, 108, 108, 111, 32, 116, 104, 101, 114, 101]


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("max_tokens", 0),
        ("n", 0),
        ("stop", ("ok", "")),
        ("seed", 1.5),
        ("top_logprobs", 21),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("min_p", 1.5),
        ("min_tokens", -1),
        ("min_tokens", 1000),
        ("stop_token_ids", (-1,)),
        ("logit_bias", {5: 101.0}),
        ("logit_bias", {"x": 1.0}),
    ],
)
def test_invalid_sampling_params_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}"):
        SamplingParams(**{field: value})


def test_top_logprobs_without_logprobs_is_refused():
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(top_logprobs=3)


def test_max_tokens_caps_the_output_and_reports_length(make_engine):
    out = make_engine().generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    )[0][0]
    assert len(out.token_ids) == 7
    assert out.finish_reason is FinishReason.LENGTH
    assert out.metrics is not None and out.metrics.output_tokens == 7


def test_stop_string_across_tokens_ends_the_output_before_it(make_engine):
    engine = make_engine()
    full = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40))[0][0]
    assert len(full.text) >= 14, full.text
    stop = full.text[10:13]  # three one-byte tokens: matched across token boundaries
    expected = full.text[: full.text.index(stop)]
    params = SamplingParams(temperature=0, max_tokens=40, stop=("never-there", stop))
    rid = engine.add_request(PROMPT, params)
    deltas = []
    while engine.has_work():
        deltas += [d for d in engine.step() if d.request_id == rid]
    assert "".join(d.text for d in deltas) == expected
    assert deltas[-1].finish_reason is FinishReason.STOP
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_text_state_matches_a_stop_string_inside_and_across_bpe_tokens():
    tok = BPETokenizer.train(["say hello world, hello there, world peace"] * 50, vocab_size=400)
    ids = tok.encode("say hello world again")
    assert len(ids) < len("say hello world again")  # multi-character tokens
    state = TextState(tok, ("lo wor",))
    streamed = ""
    for i in ids:
        stopped = state.push(i)
        streamed += state.take(final=stopped)
        assert "lo" not in streamed  # a possible stop start is held back, never streamed
        if stopped:
            break
    assert stopped and streamed == "say hel"


def test_end_token_finishes_with_stop_and_is_not_in_the_output(make_engine):
    engine = make_engine()
    ref = greedy_reference(engine.current.runner.model, PROMPT, 20, END)
    # make the 6th greedy token the policy's end token (random weights rarely emit <|end|>)
    tokenizer = engine.current.policy.tokenizer
    tokenizer.end_id = ref[5]
    out = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20))[0][0]
    assert out.token_ids == ref[:5]
    assert out.finish_reason is FinishReason.STOP
    assert out.text == tokenizer.decode(ref[:5])
    ignoring = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    assert engine.generate([PROMPT], ignoring)[0][0].token_ids == ref


def test_n_candidates_come_back_indexed_and_differ(make_engine):
    params = SamplingParams(temperature=1.0, n=3, max_tokens=12, seed=42, ignore_eos=True)
    (cands,) = make_engine().generate([PROMPT], params)
    assert [c.index for c in cands] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 for c in cands)
    assert len({tuple(c.token_ids) for c in cands}) == 3
    # candidate i is reproducible on its own
    again = make_engine().generate([PROMPT], params)[0]
    assert [c.token_ids for c in again] == [c.token_ids for c in cands]


def test_logprobs_are_the_models_log_probabilities_with_sorted_alternatives(make_engine):
    engine = make_engine()
    model = engine.current.runner.model
    params = SamplingParams(temperature=0.8, max_tokens=6, seed=3, logprobs=True, top_logprobs=4)
    out = engine.generate([PROMPT], params)[0][0]
    assert len(out.logprobs) == len(out.token_ids) == 6
    tokens = torch.tensor([PROMPT + out.token_ids])
    with torch.no_grad():
        expected = torch.log_softmax(model(tokens)[0], dim=-1)
    for i, lp in enumerate(out.logprobs):
        row = expected[len(PROMPT) - 1 + i]
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
        assert len(lp.top) == 4
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert lp.top[0][0] == int(row.argmax())
    plain = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=3))[0][0]
    assert plain.logprobs is None


@torch.no_grad()
def _greedy_with_penalties(model, prompt, steps, presence, frequency):
    tokens, out = list(prompt), []
    for _ in range(steps):
        logits = model(torch.tensor([tokens]))[0, -1]
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0])
        logits = logits - frequency * counts - presence * (counts > 0).float()
        nxt = int(logits.argmax())
        out.append(nxt)
        tokens.append(nxt)
    return out


@pytest.mark.parametrize("presence, frequency", [(2.0, 0.0), (0.0, 1.5), (0.5, 0.5)])
def test_presence_and_frequency_penalties_follow_the_openai_definition(
    make_engine, presence, frequency
):
    engine = make_engine()
    model = engine.current.runner.model
    params = SamplingParams(
        temperature=0,
        max_tokens=30,
        presence_penalty=presence,
        frequency_penalty=frequency,
        ignore_eos=True,
    )
    out = engine.generate([PROMPT], params)[0][0]
    assert out.token_ids == _greedy_with_penalties(model, PROMPT, 30, presence, frequency)
    plain = engine.generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    )[0][0]
    assert len(set(out.token_ids)) >= len(set(plain.token_ids))


def test_top_k_one_and_tiny_top_p_are_greedy():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    greedy = logits.argmax(dim=-1)
    assert torch.equal(sample_rows(logits, [1.0] * 4, [1.0] * 4, [1] * 4, gens), greedy)
    assert torch.equal(sample_rows(logits, [1.0] * 4, [1e-6] * 4, [0] * 4, gens), greedy)


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0]]))
    gen = torch.Generator().manual_seed(0)
    draws = [int(sample_rows(logits, [1.0], [1.0], [0], [gen])[0]) for _ in range(3000)]
    freq = [draws.count(i) / len(draws) for i in range(4)]
    assert freq[0] == pytest.approx(0.7, abs=0.03)
    assert freq[1] == pytest.approx(0.2, abs=0.03)
    assert freq[3] == 0
    # top_k=2 renormalises over the two most likely
    draws = [int(sample_rows(logits, [1.0], [1.0], [2], [gen])[0]) for _ in range(2000)]
    assert set(draws) == {0, 1}
    assert draws.count(0) / len(draws) == pytest.approx(0.7 / 0.9, abs=0.03)


def test_byte_tokenizer_end_id_is_what_the_tests_assume():
    assert ByteTokenizer(300).end_id == END


@torch.no_grad()
def _greedy_shaped(model, prompt, steps, shape):
    tokens, out = list(prompt), []
    for _ in range(steps):
        logits = shape(model(torch.tensor([tokens]))[0, -1].clone(), tokens, out)
        nxt = int(logits.argmax())
        out.append(nxt)
        tokens.append(nxt)
    return out


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens(
    make_engine,
):
    engine = make_engine()
    model = engine.current.runner.model

    def shape(logits, tokens, _out):
        seen = torch.tensor(sorted(set(tokens)))
        v = logits[seen]
        logits[seen] = torch.where(v > 0, v / 1.8, v * 1.8)
        return logits

    params = SamplingParams(temperature=0, max_tokens=25, repetition_penalty=1.8, ignore_eos=True)
    out = engine.generate([PROMPT], params)[0][0]
    assert out.token_ids == _greedy_shaped(model, PROMPT, 25, shape)
    plain = SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)
    assert out.token_ids != engine.generate([PROMPT], plain)[0][0].token_ids


def test_logit_bias_forces_or_forbids_a_token(make_engine):
    engine = make_engine()
    forced = SamplingParams(temperature=0.9, max_tokens=5, seed=1, logit_bias={65: 100.0})
    assert engine.generate([PROMPT], forced)[0][0].token_ids == [65] * 5
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    first = engine.generate([PROMPT], plain)[0][0].token_ids[0]
    banned = SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, logit_bias={str(first): -100.0}
    )  # string keys, as JSON (the Triton wire) gives them
    assert first not in engine.generate([PROMPT], banned)[0][0].token_ids
    # batched with plain rows, the plain row is unchanged
    both = engine.generate([PROMPT, PROMPT], [forced, plain])
    assert both[0][0].token_ids == [65] * 5
    assert both[1][0].token_ids == engine.generate([PROMPT], plain)[0][0].token_ids


def test_min_tokens_holds_back_the_end_and_stop_token_ids_end_a_candidate(make_engine):
    engine = make_engine()
    ref = greedy_reference(engine.current.runner.model, PROMPT, 20, END)
    tokenizer = engine.current.policy.tokenizer
    tokenizer.end_id = ref[2]  # greedy would end after two tokens
    early = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20))[0][0]
    assert early.token_ids == ref[:2] and early.finish_reason is FinishReason.STOP
    held = SamplingParams(temperature=0, max_tokens=20, min_tokens=8)
    out = engine.generate([PROMPT], held)[0][0]
    assert len(out.token_ids) >= 8 and ref[2] not in out.token_ids[:8]
    # a stop token id ends the candidate like the end token, and is not output
    tokenizer.end_id = END
    stop_at = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=(ref[4],))
    out = engine.generate([PROMPT], stop_at)[0][0]
    assert out.token_ids == ref[: ref.index(ref[4])] and out.finish_reason is FinishReason.STOP


def test_min_p_keeps_only_tokens_near_the_most_likely():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = [
        int(sample_rows(logits, [1.0], [1.0], [0], [gen], min_ps=[0.4])[0]) for _ in range(2000)
    ]
    # 0.4 * 0.5 = 0.2: tokens 2 and 3 are dropped, 0 and 1 renormalised
    assert set(draws) == {0, 1}
    assert draws.count(0) / len(draws) == pytest.approx(0.5 / 0.8, abs=0.03)


def test_every_sampling_parameter_survives_the_triton_wire():
    from server.triton.protocol import params_from_json, params_to_json

    params = SamplingParams(
        temperature=0.7,
        stop=("x",),
        seed=5,
        repetition_penalty=1.2,
        logit_bias={7: -3.0, 65: 2.5},
        min_p=0.1,
        min_tokens=2,
        stop_token_ids=(9, 11),
        ignore_eos=True,
    )
    assert params_from_json(params_to_json(params)) == params
