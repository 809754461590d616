"""Continuous batching over the paged cache: batched output equals unbatched, seeded sampling
ignores batch composition, preemption recomputes correctly, prefixes are prefilled once."""

from __future__ import annotations

import random

import pytest
from conftest import greedy_reference, run_with_arrivals

from server.engine import EngineOverloaded, FinishReason, SamplingParams
from server.engine.offline import generate

GREEDY = SamplingParams(temperature=0, max_tokens=24)
END = 260  # ByteTokenizer(300).end_id


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(32, 127) for _ in range(9)]
    prompts = []
    for i in range(count):
        tail = [rng.randrange(32, 127) for _ in range(rng.randrange(1, 40))]
        # half of them share a "system prompt" so prefix blocks are shared mid-batch
        prompts.append(system + tail if i % 2 else tail)
    return prompts


def test_greedy_batched_equals_unbatched_for_every_request_in_a_mixed_batch(make_engine, registry):
    engine = make_engine()
    model = engine.current.runner.model
    prompts = _prompts(8)
    batched = engine.generate(prompts, GREEDY)
    one_at_a_time = make_engine()
    for prompt, (out,) in zip(prompts, batched, strict=True):
        assert out.token_ids == greedy_reference(model, prompt, 24, END)
        single = one_at_a_time.generate([prompt], GREEDY)[0][0]
        assert out.token_ids == single.token_ids
        assert out.text == single.text
    # and equal to the offline helper's, which sizes an engine of its own for the batch
    policy = registry.load("v1")
    offline = generate(policy.model, policy.tokenizer, prompts, GREEDY)
    assert [o[0].token_ids for o in batched] == [d.token_ids for d in offline]


def test_requests_arriving_mid_stream_join_the_batch_and_still_match_unbatched(make_engine):
    engine = make_engine()
    model = engine.current.runner.model
    # a new request every third step
    for prompt, tokens in run_with_arrivals(engine, _prompts(6, seed=3), GREEDY):
        assert tokens == greedy_reference(model, prompt, 24, END)


def test_seeded_sampling_gives_the_same_text_whatever_else_is_in_the_batch(make_engine):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=20, seed=1234)
    prompt = _prompts(1, seed=7)[0]
    alone = make_engine().generate([prompt], params)[0][0]
    noisy = SamplingParams(temperature=1.3, max_tokens=30)  # unseeded neighbours

    engine = make_engine()
    for p in _prompts(3, seed=9):
        engine.add_request(p, noisy)
    target = engine.add_request(prompt, params)
    engine.add_request(_prompts(1, seed=10)[0], SamplingParams(temperature=0))
    in_crowd = []
    for step in range(10_000):
        if not engine.has_work():
            break
        if step == 4:  # and more arrive mid-stream
            engine.add_request(_prompts(1, seed=12)[0], noisy)
        in_crowd += [d for d in engine.step() if d.request_id == target]
    assert "".join(d.text for d in in_crowd) == alone.text
    assert [t for d in in_crowd for t in d.token_ids] == alone.token_ids

    reseeded = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=20, seed=5)
    assert make_engine().generate([prompt], reseeded)[0][0].token_ids != alone.token_ids


def test_preemption_under_a_tiny_block_pool_completes_every_request_correctly(make_engine):
    # 12 blocks of 4 tokens cannot hold 6 sequences of ~30 tokens at once
    engine = make_engine(num_blocks=12, block_size=4)
    model = engine.current.runner.model
    prompts = [p[:8] for p in _prompts(6, seed=11)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    results = engine.generate(prompts, params)
    stats = engine.stats()
    assert stats.preemptions > 0
    for prompt, (out,) in zip(prompts, results, strict=True):
        assert out.finish_reason is FinishReason.LENGTH
        assert len(out.token_ids) == 20
        assert out.token_ids == greedy_reference(model, prompt, 20, end_id=None)
    assert stats.kv_blocks_used == 0


def test_an_answer_that_outgrows_the_whole_pool_ends_with_length_instead_of_looping(make_engine):
    # 12 blocks of 4 tokens hold the keys of 48 tokens: a 40-token prompt can be followed by 9
    # (the last one is never fed back), whatever is preempted; the engine used to preempt and
    # re-admit such a sequence forever
    engine = make_engine(num_blocks=12, block_size=4)
    model = engine.current.runner.model
    prompt = list(range(40, 80))
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    (out,) = engine.generate([prompt, prompt[:5]], params)[0]
    assert out.finish_reason is FinishReason.LENGTH
    assert len(out.token_ids) == 9
    assert out.token_ids == greedy_reference(model, prompt, 9, end_id=None)
    assert engine.stats().kv_blocks_used == 0


def test_a_prompt_larger_than_the_whole_pool_is_refused_up_front(make_engine):
    engine = make_engine(num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="does not fit"):
        engine.add_request(list(range(40, 60)), GREEDY)


def test_n_candidates_and_a_shared_system_prompt_are_prefilled_once(make_engine):
    engine = make_engine(block_size=4, num_blocks=512)
    prompt = [random.Random(1).randrange(32, 127) for _ in range(203)]
    params = SamplingParams(temperature=1.0, n=4, max_tokens=5, seed=0)
    engine.add_request(prompt, params)
    first = engine.step()  # one prefill; the other three fork from it
    assert sorted(d.index for d in first) == [0, 1, 2, 3]
    assert all(len(d.token_ids) == 1 for d in first)
    while engine.has_work():
        engine.step()
    stats = engine.stats()
    assert stats.prompt_tokens == 4 * 203
    assert stats.prefill_tokens == 203  # the prompt is computed once
    assert stats.prefix_cache_hits == 3 * 50  # the others share its 50 full blocks
    # a second request with the same system prompt reuses its blocks
    before = engine.stats().prefill_tokens
    engine.generate([prompt[:200] + [65, 66, 67, 68]], SamplingParams(temperature=0, max_tokens=2))
    assert engine.stats().prefill_tokens - before == 4
    assert engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("length", [203, 200])  # a partial last block to copy, and none
def test_forked_candidates_generate_what_separately_seeded_requests_do(make_engine, length):
    """Candidate i of a request seeded s draws from the generator seed s + i, as the single
    candidate of a request seeded s + i does: forking from one prefill (shared blocks, a copied
    last block) must give each the same text as computing its own prompt."""
    prompt = [random.Random(2).randrange(32, 127) for _ in range(length)]
    forked = make_engine(block_size=4).generate(
        [prompt], SamplingParams(temperature=1.0, n=4, max_tokens=12, seed=40, ignore_eos=True)
    )[0]
    for i, candidate in enumerate(forked):
        alone = make_engine(block_size=4).generate(
            [prompt], SamplingParams(temperature=1.0, max_tokens=12, seed=40 + i, ignore_eos=True)
        )[0][0]
        assert candidate.token_ids == alone.token_ids
    assert len({tuple(c.token_ids) for c in forked}) > 1  # they are different samples


def test_a_full_waiting_queue_reports_overloaded(make_engine):
    engine = make_engine(max_waiting=2)
    engine.add_request([40, 41], GREEDY)
    engine.add_request([40, 42], GREEDY)
    with pytest.raises(EngineOverloaded):
        engine.add_request([40, 43], GREEDY)
    engine.step()  # both admitted: the queue has room again
    engine.add_request([40, 43], GREEDY)


def test_prompt_must_leave_room_in_the_model_context(make_engine):
    engine = make_engine()
    with pytest.raises(ValueError, match="prompt must have"):
        engine.add_request([], GREEDY)
    with pytest.raises(ValueError, match="prompt must have"):
        engine.add_request([50] * 1024, GREEDY)
