"""The CPU serving copy: prepacked matmuls give F.linear's numbers, the state dict is untouched,
and a generate() leaves the caller's torch thread setting as it found it."""

import pytest
import torch
import torch.nn.functional as F

from server.engine import EngineConfig, LLMEngine, SamplingParams
from server.engine.cpu_kernels import PrepackedLinear, prepacked_available, step_threads
from shared.checkpoints import Policy
from shared.model import PaLM, PaLMConfig
from shared.tokenizer import ByteTokenizer

needs_onednn = pytest.mark.skipif(not prepacked_available(), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_prepacked_linear_matches_f_linear(rows: int) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200, bias=False)
    packed = PrepackedLinear(linear)
    x = torch.randn(rows, 3, 96)
    with torch.inference_mode():
        got = packed(x)
    assert got.shape == (rows, 3, 200)
    torch.testing.assert_close(got, F.linear(x, linear.weight), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_engine_prepacks_the_serving_copy_and_keeps_state_dict_names() -> None:
    torch.manual_seed(0)
    model = PaLM(PaLMConfig.from_name("tiny", num_tokens=300)).eval()
    keys = set(model.state_dict())
    engine = LLMEngine(Policy("t", model, ByteTokenizer(300), {}), EngineConfig(num_blocks=64))
    served = engine.current.runner.model
    assert isinstance(served.layers[0].fn.fused_attn_ff_proj, PrepackedLinear)
    assert isinstance(served.to_logits, PrepackedLinear)
    assert set(served.state_dict()) == keys


def test_generate_restores_the_callers_thread_count() -> None:
    torch.manual_seed(0)
    model = PaLM(PaLMConfig.from_name("tiny", num_tokens=300)).eval()
    engine = LLMEngine(
        Policy("t", model, ByteTokenizer(300), {}), EngineConfig(num_blocks=64, num_threads=2)
    )
    assert step_threads(1, 2) == 1  # a one-row decode step runs on one thread
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@needs_onednn
def test_warm_up_picks_per_shape_row_counts_and_both_paths_give_f_linear_numbers() -> None:
    """warm_up times packed against BLAS once per shape: every layer of one shape gets the same
    choice, and whichever path a row count takes, the numbers are F.linear's."""
    from server.engine.cpu_kernels import PACKED_MAX_ROWS, packed_row_counts

    torch.manual_seed(0)
    model = PaLM(PaLMConfig.from_name("tiny", num_tokens=300)).eval()
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = LLMEngine(Policy("t", model, ByteTokenizer(300), {}), EngineConfig(num_blocks=64))
    served = engine.current.runner.model
    packed = [m for m in served.modules() if isinstance(m, PrepackedLinear)]
    by_shape: dict[tuple[int, int], set[frozenset[int]]] = {}
    for m in packed:
        by_shape.setdefault((m.in_features, m.out_features), set()).add(m.packed_rows)
        assert m.packed_rows <= set(range(1, PACKED_MAX_ROWS + 1))
    assert all(len(choices) == 1 for choices in by_shape.values())
    module = packed[0]
    assert packed_row_counts(module, 1) == module.packed_rows  # timed once, then remembered
    weight = next(p for n, p in reference.items() if served.get_parameter(n) is module.weight)
    with torch.inference_mode():
        for rows_packed in (frozenset(), frozenset(range(1, PACKED_MAX_ROWS + 1))):
            module.packed_rows = rows_packed
            for rows in (1, 5, 40):
                x = torch.randn(rows, module.in_features)
                torch.testing.assert_close(module(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_thread_choice_keeps_the_faster_option_and_follows_a_change_of_load() -> None:
    """Decode steps of one size class run on whichever of one thread and every core last timed
    faster; a later timing (every PROBE_EVERY steps) undoes the choice when the machine changes,
    e.g. another busy process arrives and the second core stops paying."""
    from server.engine.cpu_kernels import PROBE_EVERY, PROBE_PAIRS, ThreadChoice

    choice = ThreadChoice(cores=2)
    step_ms = {1: 4.0, 2: 2.5}  # an idle machine: both cores win

    def run(steps: int) -> list[int]:
        used = []
        for _ in range(steps):
            threads = choice.next()
            used.append(threads)
            choice.record(step_ms[threads] / 1000, tokens=32)
        return used

    first = run(2 * PROBE_PAIRS)
    assert first[:4] == [1, 2, 2, 1]  # pairs of adjacent steps, one on each, order alternating
    assert sorted(first) == [1] * PROBE_PAIRS + [2] * PROBE_PAIRS
    assert run(PROBE_EVERY) == [2] * PROBE_EVERY  # then every step on both cores
    step_ms[2] = 7.0  # contended: the second core is busy elsewhere
    probe = run(2 * PROBE_PAIRS)
    assert sorted(probe) == [1] * PROBE_PAIRS + [2] * PROBE_PAIRS
    assert run(PROBE_EVERY) == [1] * PROBE_EVERY
    # a near tie keeps one thread, leaving the other core to the rest of the machine
    step_ms[2] = 3.9
    run(2 * PROBE_PAIRS)
    assert choice.best == 1
    # a step of a timing that raised (never recorded) restarts the timing
    step_ms[2] = 2.0
    run(PROBE_EVERY)
    assert choice.next() == 1 and choice.next() == 2  # the timing's first pair
    choice.abandon()  # ...whose second step failed
    assert run(2 * PROBE_PAIRS)[:2] == [1, 2]  # paired from the start again
    assert choice.best == 2


def test_decode_steps_give_the_same_tokens_on_one_thread_and_on_every_core() -> None:
    """Which thread count a wide decode step gets must not change the text: greedy replies of
    a 24-request batch are identical with wide decode steps pinned to one thread, pinned to
    two, and timed (the default, which switches between the two)."""
    torch.manual_seed(0)
    model = PaLM(PaLMConfig.from_name("tiny", num_tokens=300)).eval()
    prompts = [[5 + (i * 7 + j) % 250 for j in range(3 + i % 9)] for i in range(24)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    texts = {}
    saved = torch.get_num_threads()
    try:
        for pinned in (1, 2, None):
            engine = LLMEngine(
                Policy("t", model, ByteTokenizer(300), {}),
                EngineConfig(num_blocks=256, num_threads=2, decode_threads=pinned),
            )
            out = engine.generate(prompts, params)
            texts[pinned] = [[c.token_ids for c in r] for r in out]
            timed = engine.stats().decode_threads  # what /metrics shows as palmchat_decode_threads
            assert (timed == {}) if pinned else (set(timed) == {"16-31"})
    finally:
        torch.set_num_threads(saved)
    assert texts[1] == texts[2] == texts[None]
    with pytest.raises(ValueError, match="decode_threads"):
        EngineConfig(decode_threads=0)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, ("ACTIVE", "2000")),  # serving: a bounded spin
        ({"OMP_WAIT_POLICY": "PASSIVE"}, ("PASSIVE", "2000")),  # the operator's policy stands
        ({"GOMP_SPINCOUNT": "0"}, ("ACTIVE", "0")),  # ...and their spin count: 0 = none
    ],
)
def test_serving_commands_bound_the_openmp_spin_unless_the_operator_set_it(
    given: dict[str, str], expected: tuple[str, str | None]
) -> None:
    """What a `palmchat serve` process runs with: workers that spin at most 2,000 rounds,
    set before torch loads; an operator's own OMP_WAIT_POLICY / GOMP_SPINCOUNT are kept."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = (
        "import os, sys, server.engine.openmp as openmp; openmp.serving_process(); "
        "print(os.environ['OMP_WAIT_POLICY'], os.environ.get('GOMP_SPINCOUNT'), "
        "'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, **given},
        cwd=Path(__file__).resolve().parents[3],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    policy, spin, torch_loaded = out.stdout.split()
    assert (policy, None if spin == "None" else spin) == expected
    assert torch_loaded == "False"  # still in time: libgomp reads these when torch loads
