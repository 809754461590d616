"""Simulated rollouts with known true rates, for the tests and the benchmarks.

**Simulation** (:func:`simulate_rollouts`): many experiments with known true rates, the
decision read after every single rating, for the tests and the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.rollout.sequential import (
    _CONTINUE,
    _PROMOTE,
    _ROLLBACK,
    _STOP_CAP,
    RolloutConfig,
    _check_rate,
    _combine,
    _verdicts,
)

# ---------------------------------------------------------------------------------------------
# simulation


@dataclass(frozen=True, slots=True)
class SimulationSummary:
    """How simulated rollouts ended, the decision read after every single rating."""

    runs: int
    promoted: int
    rolled_back: int
    stopped_at_cap: int
    false_decision_rate: float  # share of runs whose decision contradicts the true rates
    median_ratings_to_decision: float | None  # thumbs + battles, over promoted/rolled-back runs


def simulate_rollouts(
    active_rate: float,
    canary_rate: float,
    *,
    runs: int = 200,
    config: RolloutConfig | None = None,
    canary_share: float = 0.5,
    battle_share: float = 0.0,
    canary_win_rate: float = 0.5,
    seed: int = 0,
) -> SimulationSummary:
    """Run ``runs`` experiments with known true rates through the decision rule.

    Each rating is a battle with probability ``battle_share`` (the canary wins with
    ``canary_win_rate``), else a thumbs vote on the canary with probability ``canary_share``.
    A promotion is false unless every signal in play is truly better than its null; a rollback
    is false unless one is truly worse. With equal rates (an A/A test) any decision is false.
    """
    config = config or RolloutConfig()
    _check_rate("active_rate", active_rate)
    _check_rate("canary_rate", canary_rate)
    _check_rate("canary_win_rate", canary_win_rate)
    if not 0.0 < canary_share < 1.0:
        raise ValueError(f"canary_share must be in (0, 1), got {canary_share!r}")
    if not 0.0 <= battle_share < 1.0:
        raise ValueError(f"battle_share must be in [0, 1), got {battle_share!r}")
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs!r}")
    rng = np.random.default_rng(seed)
    block = 1024
    state = np.zeros((6, runs), dtype=np.int64)  # ups_a, n_a, ups_c, n_c, wins, losses
    seen = np.zeros(runs, dtype=np.int64)
    code = np.zeros(runs, dtype=np.int8)
    ratings_at = np.zeros(runs, dtype=np.int64)
    live = np.arange(runs)
    while live.size:
        shape = (live.size, block)
        battle = rng.random(shape) < battle_share
        to_canary = rng.random(shape) < canary_share
        p_good = np.where(battle, canary_win_rate, np.where(to_canary, canary_rate, active_rate))
        good = rng.random(shape) < p_good
        on_a, on_c = ~battle & ~to_canary, ~battle & to_canary
        steps = (good & on_a, on_a, good & on_c, on_c, good & battle, ~good & battle)
        cum = [state[i, live][:, None] + np.cumsum(s, axis=1) for i, s in enumerate(steps)]
        thumbs, fights = _verdicts(cum[0], cum[1], cum[2], cum[3], cum[4], cum[5], config)
        codes = _combine(thumbs, fights, cum[1], cum[3], config)
        hit = codes != _CONTINUE
        ended = hit.any(axis=1)
        first = hit.argmax(axis=1)[ended]
        done = live[ended]
        code[done] = codes[ended, first]
        ratings_at[done] = seen[done] + first + 1
        for i, c in enumerate(cum):
            state[i, live] = c[:, -1]
        seen[live] += block
        live = live[~ended]
    truths = [np.sign(round(canary_rate - active_rate + config.margin, 12))]
    if battle_share > 0.0 and config.battle_alpha_share > 0.0:
        truths.append(np.sign(round(canary_win_rate - 0.5 + config.win_rate_margin, 12)))
    promoted, rolled_back = code == _PROMOTE, code == _ROLLBACK
    false = (promoted & (min(truths) <= 0)) | (rolled_back & (min(truths) >= 0))
    decided = ratings_at[promoted | rolled_back]
    return SimulationSummary(
        runs=runs,
        promoted=int(promoted.sum()),
        rolled_back=int(rolled_back.sum()),
        stopped_at_cap=int((code == _STOP_CAP).sum()),
        false_decision_rate=float(false.mean()),
        median_ratings_to_decision=float(np.median(decided)) if decided.size else None,
    )
