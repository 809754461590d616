"""Synthetic task generator, text-only solver/checker and scripted rater."""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from demo import rater as rater_module
from demo import tasks as tasks_module
from demo.rater import (
    PREFERENCES,
    ScriptedRater,
    check_python,
    extract_function,
    is_correct,
    rate,
    solve,
)
from demo.tasks import (
    CORRECT_STYLES,
    FAMILIES,
    PY_SPECS,
    STYLES,
    Task,
    TaskGenerator,
    sft_conversations,
    split_of,
)

SEEDS = st.integers(min_value=0, max_value=2**32)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def prompt_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def one_task_per_family(seed: int) -> list[Task]:
    gen = TaskGenerator(seed)
    return [gen.sample(family) for family in FAMILIES]


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return list(TaskGenerator(1234).iter_tasks(900, split=None))


# --------------------------------------------------------------------------- generator


def test_same_seed_gives_same_tasks() -> None:
    a = list(TaskGenerator(7).iter_tasks(200, split=None))
    b = list(TaskGenerator(7).iter_tasks(200, split=None))
    assert a == b


def test_different_seeds_give_different_tasks() -> None:
    a = [t.messages for t in TaskGenerator(7).iter_tasks(50)]
    b = [t.messages for t in TaskGenerator(8).iter_tasks(50)]
    assert a != b


def test_all_families_appear_in_500_samples() -> None:
    seen = Counter(t.family for t in TaskGenerator(0).iter_tasks(500, split=None))
    assert set(seen) == set(FAMILIES)
    assert len(FAMILIES) >= 9


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_of_a_family_returns_that_family(family: str) -> None:
    gen = TaskGenerator(3)
    assert all(gen.sample(family).family == family for _ in range(20))


def test_unknown_family_or_split_is_rejected() -> None:
    gen = TaskGenerator(0)
    with pytest.raises(ValueError):
        gen.sample("poetry")
    with pytest.raises(ValueError):
        next(gen.iter_tasks(1, split="test"))


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_uses_several_prompt_phrasings(family: str) -> None:
    gen = TaskGenerator(11)
    shapes = set()
    for _ in range(150):
        words = re.sub(r"\d+", "#", gen.sample(family).prompt.lower()).split()
        shapes.add(" ".join(words[:2]))
    assert len(shapes) >= 3, shapes


def test_tasks_are_well_formed(tasks: list[Task]) -> None:
    for t in tasks:
        assert t.messages[-1]["role"] == "user"
        assert [m["role"] for m in t.messages] in (["user"], ["user", "assistant", "user"])
        assert set(t.replies) == set(STYLES)
        assert t.replies["curt"] == t.answer
        assert len(set(t.replies.values())) == len(STYLES)
        assert (t.family in ("followup", "correction")) == (len(t.messages) == 3)


def test_texts_are_short_and_ascii(tasks: list[Task]) -> None:
    for t in tasks:
        for m in t.messages:
            assert m["content"].isascii() and len(m["content"]) <= 80, m
            # as short as users type them ("Hi!", "9*7"), never empty
            assert m["role"] != "user" or len(m["content"]) >= 3, m
        for reply in t.replies.values():
            assert reply.isascii() and len(reply) <= 140, reply


def test_rambling_is_two_to_three_times_longer_than_courteous(tasks: list[Task]) -> None:
    ratios = [len(t.replies["rambling"]) / len(t.replies["courteous"]) for t in tasks]
    assert 1.5 <= statistics.mean(ratios) <= 3.5


def test_train_and_heldout_splits_are_disjoint_on_prompt_text() -> None:
    train = list(TaskGenerator(5).iter_tasks(3000, split="train"))
    heldout = list(TaskGenerator(6).iter_tasks(600, split="heldout"))
    assert all(t.split == "train" for t in train)
    assert all(t.split == "heldout" for t in heldout)
    assert not {prompt_text(t.messages) for t in train} & {prompt_text(t.messages) for t in heldout}
    first_train = {t.messages[0]["content"] for t in train}
    assert not first_train & {t.messages[0]["content"] for t in heldout}
    assert {t.family for t in heldout} == set(FAMILIES)


def test_about_ten_percent_of_prompts_are_heldout() -> None:
    generated = list(TaskGenerator(9).iter_tasks(3000, split=None))
    fraction = sum(t.split == "heldout" for t in generated) / len(generated)
    assert 0.06 < fraction < 0.14


def test_split_is_decided_by_the_opening_question_text() -> None:
    for t in TaskGenerator(2).iter_tasks(200, split=None, family="followup"):
        assert split_of(t.messages) == split_of(t.messages[:1])
        assert split_of(json.loads(json.dumps(t.messages))) == t.split


# --------------------------------------------------------------------------- solving / checking


@settings(max_examples=25, deadline=None)
@given(seed=SEEDS)
def test_solve_recovers_the_answer_of_every_generated_task(seed: int) -> None:
    for task in one_task_per_family(seed):
        assert solve(json.loads(json.dumps(task.messages))) == task.answer


@settings(max_examples=25, deadline=None)
@given(seed=SEEDS)
def test_is_correct_accepts_correct_styles_and_rejects_wrong(seed: int) -> None:
    for task in one_task_per_family(seed):
        for style in CORRECT_STYLES:
            assert is_correct(task.messages, task.replies[style]) is True, (task, style)
        assert is_correct(task.messages, task.replies["wrong"]) is False, task


def test_numbers_are_matched_as_whole_tokens() -> None:
    msgs = user("What is 6 + 6?")
    assert is_correct(msgs, "12")
    assert is_correct(msgs, "Sure! 6 + 6 = 12. Happy to help.")
    assert not is_correct(msgs, "120")
    assert not is_correct(msgs, "6 + 6 = 13")
    assert not is_correct(msgs, "It is 12 or 13.")
    assert is_correct(user("What is 10 - 5?"), "10 - 5 = 5")
    assert not is_correct(user("What is 10 - 5?"), "10 - 5 = 6")


def test_words_are_matched_case_insensitively_as_whole_words() -> None:
    msgs = user("What is the capital of France?")
    assert is_correct(msgs, "PARIS")
    assert is_correct(msgs, "The capital of France is paris.")
    assert not is_correct(msgs, "Parisian food is great.")
    assert is_correct(user("Spell 'robot' backwards."), "'robot' reversed is 'tobor'.")


def test_sorting_checks_the_order_of_the_items() -> None:
    msgs = user("Sort these numbers: 5, 2, 9.")
    assert is_correct(msgs, "Sorted: 2, 5, 9.")
    assert not is_correct(msgs, "Sorted: 2, 9, 5.")
    assert not is_correct(msgs, "2, 5")
    words = user("Alphabetize: pear, fig, apple.")
    assert solve(words) == "apple, fig, pear"
    assert is_correct(words, "Apple, Fig, Pear")


def test_email_must_mention_the_name_and_the_fact() -> None:
    msgs = user("Write a short email to Sam saying the meeting moved to Friday.")
    assert solve(msgs) == "Hi Sam, the meeting moved to Friday."
    assert is_correct(msgs, "Hello Sam,\nJust so you know, the meeting moved to Friday.")
    assert not is_correct(msgs, "Hi Alex, the meeting moved to Friday.")
    assert not is_correct(msgs, "Hi Sam, the meeting moved to Monday.")
    assert not is_correct(user("Email Kim that lunch is at 1 pm."), "Hi Kim, lunch is at 11 pm.")


def test_followup_is_solved_from_the_earlier_question() -> None:
    msgs = [
        {"role": "user", "content": "What is 7 + 5?"},
        {"role": "assistant", "content": "12"},
        {"role": "user", "content": "And double that?"},
    ]
    assert solve(msgs) == "24"
    assert is_correct(msgs, "Sure! 12 doubled is 24. Happy to help.")
    assert not is_correct(msgs, "12")
    reverse = [
        {"role": "user", "content": "What is the capital of Peru?"},
        {"role": "assistant", "content": "Lima"},
        {"role": "user", "content": "Now reverse it."},
    ]
    assert solve(reverse) == "amiL"
    assert solve(reverse[-1:]) is None


@pytest.mark.parametrize(
    "messages",
    [
        user("Tell me a joke about cats."),
        user(""),
        [],
        [{"role": "system", "content": "What is 2 + 2?"}],
        [{"role": "user", "content": None}],
        user("And double that?"),
    ],
)
def test_unrecognised_prompt_gives_zero_and_none(messages: list[dict]) -> None:
    assert solve(messages) is None
    assert is_correct(messages, "4") is None
    assert rate(messages, "4") == 0.0
    for preference in PREFERENCES:
        assert ScriptedRater(preference).rate(messages, "Sure! 4. Happy to help.") == 0.0


# --------------------------------------------------------------------------- python tasks


@pytest.mark.parametrize("name", sorted(PY_SPECS))
def test_reference_python_functions_pass_and_their_wrong_variants_fail(name: str) -> None:
    spec = PY_SPECS[name]
    assert check_python(spec.code(), name)
    assert check_python(spec.code(name="my_func"), name)
    assert not check_python(spec.code(spec.wrong), name)


def test_python_task_replies_pass_the_exec_check() -> None:
    for task in TaskGenerator(4).iter_tasks(40, split=None, family="python"):
        for style in CORRECT_STYLES:
            assert is_correct(task.messages, task.replies[style]) is True
        assert is_correct(task.messages, task.replies["wrong"]) is False


@pytest.mark.parametrize(
    ("reply", "right"),
    [
        ("def square(x):\n    return x * x", True),
        ("```python\ndef sq(n):\n    return n ** 2\n```", True),
        ("def square(x):\n    return x * 2", False),
        ("def square(x)\n    return x * x", False),
        ("def square(x, y):\n    return x * x", False),
        ("x * x", False),
    ],
)
def test_broken_python_function_fails_the_check(reply: str, right: bool) -> None:
    msgs = user("Write a Python function that returns the square of x.")
    assert is_correct(msgs, reply) is right


@pytest.mark.parametrize(
    "code",
    [
        "def f(x):\n    import os\n    return x * x",
        "def f(x):\n    return x.__mul__(x)",
        "def f(x):\n    return __import__('os') and x * x",
        "def f(x):\n    while True:\n        pass",
        "def f(x):\n    return sum([x for _ in range(x)]) and x * x",
        "def f(x):\n    return x ** 99 and x * x",
        "def f(x=2):\n    return x * x",
        "def f(x: print('hi')):\n    return x * x",
        "def f(x):\n    return (lambda: x * x)()",
        "def f(x):\n    return eval('x * x')",
        "def f(x):\n    y = x\n    return y * y",
    ],
)
def test_python_check_rejects_unsafe_or_non_expression_code(code: str) -> None:
    assert not check_python(code, "square")


def test_extract_function_stops_at_the_first_unindented_line() -> None:
    reply = "Sure! Here it is:\ndef cube(x):\n    return x * x * x\nHappy to help."
    assert extract_function(reply) == "def cube(x):\n    return x * x * x"
    assert extract_function("no code here") is None


# --------------------------------------------------------------------------- rater


def mean_scores(tasks: list[Task], rater: ScriptedRater) -> dict[str, float]:
    return {s: statistics.mean(rater.rate(t.messages, t.replies[s]) for t in tasks) for s in STYLES}


def test_courteous_rater_orders_courteous_curt_rambling_wrong(tasks: list[Task]) -> None:
    m = mean_scores(tasks, ScriptedRater("courteous"))
    assert m["courteous"] > m["curt"] > m["rambling"] > m["wrong"]


def test_concise_rater_likes_curt_best(tasks: list[Task]) -> None:
    m = mean_scores(tasks, ScriptedRater("concise"))
    assert m["curt"] > m["courteous"] > m["rambling"] > m["wrong"]


@pytest.mark.parametrize("preference", PREFERENCES)
def test_wrong_answers_score_below_every_correct_one(tasks: list[Task], preference: str) -> None:
    r = ScriptedRater(preference)
    for t in tasks:
        scores = {s: r.rate(t.messages, t.replies[s]) for s in STYLES}
        assert all(-1.0 <= v <= 1.0 for v in scores.values())
        assert scores["wrong"] < min(scores[s] for s in CORRECT_STYLES), (t, scores)


def test_rank_is_consistent_with_rate(tasks: list[Task]) -> None:
    for preference in PREFERENCES:
        r = ScriptedRater(preference)
        for t in tasks[:150]:
            replies = [t.replies[s] for s in STYLES] + ["", "no idea"]
            order = r.rank(t.messages, replies)
            assert sorted(order) == list(range(len(replies)))
            scores = [r.rate(t.messages, replies[i]) for i in order]
            assert scores == sorted(scores, reverse=True)
    t = tasks[0]
    assert ScriptedRater().rank(t.messages, [t.replies[s] for s in STYLES]) == [0, 1, 2, 3]


def test_rater_is_deterministic(tasks: list[Task]) -> None:
    for noise in (0.0, 0.05):
        a, b = ScriptedRater(noise=noise), ScriptedRater(noise=noise)
        for t in tasks[:100]:
            for s in STYLES:
                assert a.rate(t.messages, t.replies[s]) == b.rate(t.messages, t.replies[s])
                assert a.thumb(t.messages, t.replies[s]) == b.thumb(t.messages, t.replies[s])


def test_noise_is_bounded(tasks: list[Task]) -> None:
    clean, noisy = ScriptedRater(), ScriptedRater(noise=0.05)
    diffs = [
        abs(noisy.rate(t.messages, t.replies[s]) - clean.rate(t.messages, t.replies[s]))
        for t in tasks[:100]
        for s in STYLES
    ]
    assert max(diffs) <= 0.05 + 1e-9 and max(diffs) > 0


def test_thumb_is_plus_one_exactly_when_the_score_reaches_the_threshold(tasks: list[Task]) -> None:
    for threshold in (0.5, 0.0):
        r = ScriptedRater(threshold=threshold)
        for t in tasks[:100]:
            for s in STYLES:
                expected = 1 if r.rate(t.messages, t.replies[s]) >= threshold else -1
                assert r.thumb(t.messages, t.replies[s]) == expected
    t = tasks[0]
    assert ScriptedRater().thumb(t.messages, t.replies["courteous"]) == 1
    assert ScriptedRater().thumb(t.messages, t.replies["wrong"]) == -1


def test_module_level_rate_uses_the_courteous_rater(tasks: list[Task]) -> None:
    r = ScriptedRater("courteous")
    for t in tasks[:50]:
        assert rate(t.messages, t.replies["rambling"]) == r.rate(t.messages, t.replies["rambling"])


def test_unknown_preference_is_rejected() -> None:
    with pytest.raises(ValueError):
        ScriptedRater("grumpy")


def test_rater_api_is_reexported_from_tasks() -> None:
    assert tasks_module.ScriptedRater is rater_module.ScriptedRater
    assert tasks_module.is_correct is rater_module.is_correct
    assert tasks_module.rate is rater_module.rate
    assert tasks_module.solve is rater_module.solve
    with pytest.raises(AttributeError):
        _ = tasks_module.no_such_name


# --------------------------------------------------------------------------- SFT corpus


def test_sft_conversations_are_train_split_and_end_with_a_task_reply() -> None:
    convs = sft_conversations(300, seed=21)
    generated = list(TaskGenerator(21).iter_tasks(300, split="train"))
    assert len(convs) == 300
    assert convs == sft_conversations(300, seed=21)
    for conv, task in zip(convs, generated, strict=True):
        assert conv[:-1] == task.messages
        assert conv[-1]["role"] == "assistant"
        assert conv[-1]["content"] in task.replies.values()
        assert split_of(conv) == "train"


def test_sft_style_mix_follows_the_weights() -> None:
    n = 1500
    convs = sft_conversations(n, seed=3)
    generated = TaskGenerator(3).iter_tasks(n, split="train")
    counts = Counter(
        next(s for s in STYLES if t.replies[s] == c[-1]["content"])
        for c, t in zip(convs, generated, strict=True)
    )
    for style, weight in tasks_module.DEFAULT_STYLE_WEIGHTS.items():
        assert abs(counts[style] / n - weight) < 0.05, counts


def test_sft_style_weights_can_pick_a_single_style() -> None:
    convs = sft_conversations(50, seed=1, style_weights={"courteous": 1.0})
    for conv, task in zip(convs, TaskGenerator(1).iter_tasks(50), strict=True):
        assert conv[-1]["content"] == task.replies["courteous"]


@pytest.mark.parametrize("weights", [{"polite": 1.0}, {"curt": -1.0}, {"curt": 0.0}])
def test_sft_rejects_bad_style_weights(weights: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        sft_conversations(5, seed=0, style_weights=weights)


def test_family_weights_draw_families_in_proportion_and_leave_the_default_stream_alone() -> None:
    n = 2000
    weighted = TaskGenerator(5, family_weights={"arithmetic": 4.0, "greeting": 0.0})
    counts = Counter(t.family for t in weighted.iter_tasks(n, split=None))
    others = [counts[f] for f in FAMILIES if f not in ("arithmetic", "greeting")]
    share = 4 / (4 + len(others))
    assert counts["greeting"] == 0
    assert abs(counts["arithmetic"] / n - share) < 0.04, counts
    assert max(others) < counts["arithmetic"] / 2
    # no weights: the same stream as before weights existed (the bundled corpus is unchanged)
    assert sft_conversations(40, seed=2) == sft_conversations(40, seed=2, family_weights=None)
    plain = [t.messages for t in TaskGenerator(2).iter_tasks(40)]
    assert plain == [c[:-1] for c in sft_conversations(40, seed=2)]
    sorts = TaskGenerator(2, family_weights={"sort": 5.0}).iter_tasks(200)
    weighted_convs = sft_conversations(200, seed=2, family_weights={"sort": 5.0})
    assert [t.messages for t in sorts] == [c[:-1] for c in weighted_convs]


@pytest.mark.parametrize(
    "weights", [{"juggling": 1.0}, {"sort": -1.0}, dict.fromkeys(FAMILIES, 0.0)]
)
def test_bad_family_weights_are_rejected(weights: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="family_weights"):
        TaskGenerator(0, family_weights=weights)
