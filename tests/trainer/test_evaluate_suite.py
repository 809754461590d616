"""The evaluation suite: its scoring on the corpus's own replies (right, wrong, each style), and
a run on a tiny policy that covers every family and split and repeats exactly."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from demo.tasks import FAMILIES, SAFETY_FAMILIES
from shared.checkpoints import load_policy_dir
from trainer.eval_suite import RUNS, evaluate_suite, score_replies, suite_tasks

BENIGN = [f for f in FAMILIES if f not in SAFETY_FAMILIES]


@pytest.fixture(scope="module", params=["heldout", "phrasing"])
def tasks(request: pytest.FixtureRequest) -> list[Any]:
    found, skipped = suite_tasks(3, seed=7, split=request.param)
    assert {t.family for t in found} | set(skipped) == set(FAMILIES)
    return found


@pytest.mark.parametrize("style", ["courteous", "curt"])
def test_the_corpus_own_right_replies_score_right_everywhere(tasks: list[Any], style: str) -> None:
    scores = score_replies(tasks, [t.replies[style] for t in tasks])
    assert scores.n == len(tasks)
    assert set(scores.per_family.values()) == {1.0}
    assert scores.correct_rate == 1.0 and scores.lowest_rate == 1.0
    assert scores.refusal_rate == 1.0 and set(scores.refusal_by_category.values()) == {1.0}
    assert scores.over_refusal == 0.0
    assert sum(scores.counts.values()) == len(tasks)


def test_the_corpus_wrong_replies_score_wrong_everywhere(tasks: list[Any]) -> None:
    scores = score_replies(tasks, [t.replies["wrong"] for t in tasks])
    assert set(scores.per_family.values()) == {0.0}
    assert scores.correct_rate == 0.0 and scores.lowest_rate == 0.0
    assert scores.refusal_rate == 0.0  # an unsafe request's wrong reply is compliance
    assert set(scores.thumbs_up.values()) == {0.0}  # no taste likes a wrong answer


def test_each_taste_likes_its_own_style_best(tasks: list[Any]) -> None:
    up = {
        style: score_replies(tasks, [t.replies[style] for t in tasks]).thumbs_up
        for style in ("courteous", "curt")
    }
    assert up["courteous"]["courteous"] > up["curt"]["courteous"]
    assert up["curt"]["concise"] > up["courteous"]["concise"]


def test_refusing_everything_is_over_refusal(tasks: list[Any]) -> None:
    scores = score_replies(tasks, ["Sorry, I can't help with that."] * len(tasks))
    assert scores.refusal_rate == 1.0 and scores.over_refusal == 1.0
    assert scores.correct_rate == 0.0


def test_replies_must_pair_with_tasks(tasks: list[Any]) -> None:
    with pytest.raises(ValueError, match="replies"):
        score_replies(tasks, [])


def _figures(value: Any) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _figures(v)]
    return [value] if isinstance(value, float) else []


def test_a_suite_run_covers_every_family_and_repeats_exactly(tiny_seed_dir: Path) -> None:
    policy = load_policy_dir(tiny_seed_dir, "tiny")
    calls: list[tuple[str, int, int]] = []

    def run() -> dict[str, Any]:
        report = evaluate_suite(
            policy.model,
            policy.tokenizer,
            per_family=2,
            seed=3,
            max_new_tokens=6,
            version="tiny",
            progress=lambda *a: calls.append(a),
        )
        return report.to_dict()

    first, second = run(), run()
    assert first["version"] == "tiny" and first["num_params"] == policy.model.num_params()
    assert first["tokens"] > 0 and first["seconds"] > 0
    for name, scores in first["runs"].items():
        skipped = first["skipped"].get(name, {})
        assert scores["n"] == 2 * (len(FAMILIES) - len(skipped))
        assert set(scores["counts"].values()) == {2}
    assert list(first["families"]) == list(FAMILIES)
    figures = _figures({k: first[k] for k in ("summary", "families", "runs")})
    assert figures and all(0.0 <= x <= 1.0 for x in figures)
    assert (
        first["summary"]["greedy_heldout_correct"]
        == first["runs"]["greedy_heldout"]["correct_rate"]
    )
    assert set(first["summary"]["thumbs_up"]) == {"courteous", "concise"}
    assert {e["split"] for e in first["examples"]["arithmetic"]} == {"heldout", "phrasing"}
    assert {c[0] for c in calls} == set(RUNS) and all(c[1] <= c[2] for c in calls)
    drop = ("seconds",)
    assert {k: v for k, v in first.items() if k not in drop} == {
        k: v for k, v in second.items() if k not in drop
    }  # seeded sampling: a rerun gives the same replies and figures
    assert not any(math.isnan(x) for x in figures)


def test_a_bad_per_family_is_refused(tiny_seed_dir: Path) -> None:
    policy = load_policy_dir(tiny_seed_dir, "tiny")
    with pytest.raises(ValueError, match="per_family"):
        evaluate_suite(policy.model, policy.tokenizer, per_family=0)
