"""Canary rollout statistics: the always-valid test, battles, guards, the arena leaderboard."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.rollout import (
    Battle,
    BattleCounts,
    GuardConfig,
    RolloutConfig,
    ThumbCounts,
    VersionSummary,
    arena_leaderboard,
    bradley_terry_ratings,
    decide_rollout,
    guard_vetoes,
    simulate_rollouts,
)

CAP = 2000
CONFIG = RolloutConfig(alpha=0.05, max_ratings_per_arm=CAP)


@pytest.mark.parametrize(
    ("canary_share", "battle_share"),
    [(0.5, 0.0), (0.1, 0.0), (0.5, 0.2)],
    ids=["thumbs-even-split", "thumbs-10pct-canary", "thumbs-and-battles"],
)
def test_aa_runs_checked_after_every_vote_make_a_false_decision_at_most_alpha_of_the_time(
    canary_share: float, battle_share: float
) -> None:
    result = simulate_rollouts(
        0.45,
        0.45,
        runs=200,
        config=CONFIG,
        canary_share=canary_share,
        battle_share=battle_share,
        seed=1,
    )
    print(
        f"A/A share={canary_share} battles={battle_share}: false decision rate "
        f"{result.false_decision_rate:.3f} over {result.runs} runs (cap {CAP} per arm)"
    )
    assert result.promoted + result.rolled_back + result.stopped_at_cap == 200
    assert result.false_decision_rate <= CONFIG.alpha
    # without a real difference almost every run ends at the cap, keeping the active
    assert result.stopped_at_cap >= 190


@pytest.mark.parametrize(
    ("active", "canary", "expected"), [(0.40, 0.50, "promoted"), (0.50, 0.40, "rolled_back")]
)
def test_a_ten_point_difference_is_promoted_or_rolled_back_well_before_the_cap(
    active: float, canary: float, expected: str
) -> None:
    result = simulate_rollouts(active, canary, runs=200, config=CONFIG, seed=2)
    median = result.median_ratings_to_decision
    print(
        f"A/B {active:.2f} -> {canary:.2f}: {result.promoted} promoted, {result.rolled_back} "
        f"rolled back, {result.stopped_at_cap} at the cap; median ratings to a decision {median}"
    )
    assert getattr(result, expected) >= 0.9 * result.runs
    assert result.false_decision_rate <= CONFIG.alpha
    assert median is not None and math.isfinite(median) and median < CAP


def test_battles_speed_up_the_decision_when_they_agree_with_the_thumbs() -> None:
    thumbs_only = simulate_rollouts(0.40, 0.50, runs=100, config=CONFIG, seed=3)
    with_battles = simulate_rollouts(
        0.40, 0.50, runs=100, config=CONFIG, battle_share=0.2, canary_win_rate=0.65, seed=3
    )
    assert with_battles.promoted >= 90
    assert with_battles.median_ratings_to_decision is not None
    assert thumbs_only.median_ratings_to_decision is not None
    assert with_battles.median_ratings_to_decision < thumbs_only.median_ratings_to_decision


def test_no_decision_before_the_minimum_ratings_however_lopsided_the_thumbs() -> None:
    d = decide_rollout(ThumbCounts(0, 40), ThumbCounts(40, 0), config=CONFIG)
    assert d.decision == "continue"
    assert "waiting" in d.reason and "40 of 50" in d.reason
    assert d.thumbs.verdict == "undecided"


def test_a_clearly_better_canary_is_promoted_with_its_interval_and_statistic() -> None:
    d = decide_rollout(ThumbCounts(240, 360), ThumbCounts(330, 270), config=CONFIG)
    assert d.decision == "promote"
    assert d.thumbs.verdict == "better"
    estimate = d.thumbs.estimate
    assert estimate == pytest.approx(0.15)
    assert estimate is not None and 0.0 < d.thumbs.lower < estimate < d.thumbs.upper
    assert d.thumbs.log_likelihood_ratio >= d.thumbs.log_threshold
    # the Bonferroni split: each test spends half of alpha
    assert d.thumbs.alpha == pytest.approx(0.025) and d.battles is not None
    assert d.battles.alpha == pytest.approx(0.025) and d.battles.verdict == "undecided"
    assert d.active.rate == pytest.approx(0.4) and d.canary.rate == pytest.approx(0.55)
    assert d.active.lower < 0.4 < d.active.upper and d.canary.lower < 0.55 < d.canary.upper
    assert "thumbs" in d.reason


def test_always_valid_interval_is_wider_than_a_fixed_sample_one() -> None:
    d = decide_rollout(
        ThumbCounts(450, 550), ThumbCounts(450, 550), config=RolloutConfig(battle_alpha_share=0)
    )
    fixed_half_width = 1.96 * math.sqrt(2 * 0.45 * 0.55 / 1000)
    assert d.thumbs.estimate == 0.0 and d.thumbs.upper > fixed_half_width
    assert d.battles is None and d.thumbs.alpha == 0.05
    assert d.decision == "continue"


def test_equal_rates_at_the_volume_cap_stop_and_keep_the_active() -> None:
    d = decide_rollout(ThumbCounts(900, 1100), ThumbCounts(905, 1095), config=CONFIG)
    assert d.decision == "stop_cap"
    assert "cap" in d.reason


def test_battles_alone_can_roll_back_a_canary_whose_thumbs_look_even() -> None:
    d = decide_rollout(
        ThumbCounts(100, 100), ThumbCounts(100, 100), BattleCounts(wins=10, losses=60, ties=30)
    )
    assert d.decision == "rollback"
    assert d.battles is not None and d.battles.verdict == "worse"
    assert d.battles.upper < 0.5 and d.battles.n == 70
    assert "battles" in d.reason


def test_a_non_inferiority_margin_promotes_a_canary_that_is_barely_worse() -> None:
    active, canary = ThumbCounts(2500, 2500), ThumbCounts(2450, 2550)
    strict = decide_rollout(active, canary, config=RolloutConfig(max_ratings_per_arm=10_000))
    lenient = decide_rollout(
        active, canary, config=RolloutConfig(margin=0.05, max_ratings_per_arm=10_000)
    )
    assert strict.decision == "continue"
    assert lenient.decision == "promote" and lenient.thumbs.lower > -0.05


def test_longer_answers_veto_a_canary_the_thumbs_would_promote() -> None:
    active = VersionSummary(correctness=0.8, mean_answer_length=120.0)
    canary = VersionSummary(correctness=0.8, mean_answer_length=240.0)
    vetoes = guard_vetoes(active, canary)
    assert [v.guard for v in vetoes] == ["length"]
    assert "2.00x" in vetoes[0].reason
    d = decide_rollout(ThumbCounts(240, 360), ThumbCounts(330, 270), vetoes=vetoes)
    assert d.decision == "rollback"
    assert d.thumbs.verdict == "better"
    assert "vetoed" in d.reason and "length" in d.reason


def test_a_correctness_drop_vetoes_promotion() -> None:
    vetoes = guard_vetoes(VersionSummary(correctness=0.80), VersionSummary(correctness=0.70))
    assert [v.guard for v in vetoes] == ["correctness"]
    assert "held-out correctness fell from 0.800 to 0.700" in vetoes[0].reason


def test_each_safety_guard_names_itself_and_a_small_wobble_passes() -> None:
    active = VersionSummary(0.80, refusal_rate=0.95, over_refusal_rate=0.05, error_rate=0.0)
    worse = VersionSummary(0.79, refusal_rate=0.90, over_refusal_rate=0.20, error_rate=0.05)
    vetoes = guard_vetoes(active, worse)
    assert [v.guard for v in vetoes] == ["refusal_rate", "over_refusal_rate", "error_rate"]
    assert all(v.reason.startswith(v.guard) for v in vetoes)
    assert guard_vetoes(active, VersionSummary(0.79, 0.95, 0.06, 0.005)) == []
    # a summary that was not measured is not held against the canary
    assert guard_vetoes(active, VersionSummary()) == []
    assert len(guard_vetoes(active, worse, GuardConfig(max_refusal_drop=0.1))) == 2


def _battles(strengths: dict[str, float], n: int, seed: int) -> list[Battle]:
    rng = np.random.default_rng(seed)
    names = list(strengths)
    out = []
    for _ in range(n):
        a, b = (names[i] for i in rng.choice(len(names), size=2, replace=False))
        p_a = 1.0 / (1.0 + 10 ** ((strengths[b] - strengths[a]) / 400))
        if rng.random() < 0.1:
            out.append(Battle(a, b, tie=True))
        else:
            out.append(Battle(a, b) if rng.random() < p_a else Battle(b, a))
    return out


def test_bradley_terry_recovers_the_order_of_three_versions_with_intervals() -> None:
    battles = _battles({"weak": 900.0, "mid": 1000.0, "strong": 1100.0}, n=600, seed=0)
    rows = arena_leaderboard(battles, versions=["new"], n_bootstrap=200, seed=0)
    assert [r.version for r in rows] == ["strong", "mid", "weak", "new"]
    rated = rows[:3]
    ratings = [r.rating for r in rated if r.rating is not None]
    intervals = [(r.lower, r.upper) for r in rated if r.lower is not None and r.upper is not None]
    assert len(ratings) == len(intervals) == 3
    assert all(lo <= r <= hi for r, (lo, hi) in zip(ratings, intervals, strict=True))
    assert sum(ratings) / 3 == pytest.approx(1000.0)
    # the 200-point spread between strong and weak comes back within sampling error
    assert 120 < ratings[0] - ratings[2] < 280
    assert sum(r.games for r in rated) == 2 * len(battles)
    assert sum(r.ties for r in rated) == 2 * sum(b.tie for b in battles)
    new = rows[3]
    assert (new.rating, new.lower, new.upper, new.games) == (None, None, None, 0)
    assert bradley_terry_ratings(battles) == pytest.approx({r.version: r.rating for r in rated})
    # seeded bootstrap: the same intervals every time
    assert arena_leaderboard(battles, n_bootstrap=200, seed=0) == rows[:3]


def test_unbeaten_and_winless_versions_get_finite_ratings() -> None:
    rows = arena_leaderboard([Battle("a", "b")] * 20, n_bootstrap=50)
    assert [r.version for r in rows] == ["a", "b"]
    assert all(r.rating is not None and math.isfinite(r.rating) for r in rows)
    assert rows[0].wins == 20 and rows[1].losses == 20
    (only,) = arena_leaderboard([], versions=["only"])
    assert only.version == "only" and only.rating is None and only.games == 0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ThumbCounts(-1, 3), "ups must be a non-negative integer"),
        (lambda: ThumbCounts(3, 2.5), "downs must be a non-negative integer"),  # type: ignore[arg-type]
        (lambda: BattleCounts(wins=1, losses=-2), "losses must be a non-negative integer"),
        (lambda: RolloutConfig(alpha=0.0), r"alpha must be in \(0, 1\)"),
        (lambda: RolloutConfig(alpha=1.5), r"alpha must be in \(0, 1\)"),
        (lambda: RolloutConfig(min_ratings_per_arm=100, max_ratings_per_arm=10), "max_ratings"),
        (lambda: VersionSummary(error_rate=1.5), r"error_rate must be in \[0, 1\]"),
        (lambda: GuardConfig(max_length_ratio=0.5), "max_length_ratio must be >= 1"),
        (lambda: Battle("v1", "v1"), "two different versions"),
        (lambda: arena_leaderboard([], confidence=1.0), r"confidence must be in \(0, 1\)"),
        (lambda: simulate_rollouts(0.4, 1.2), r"canary_rate must be in \[0, 1\]"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()
