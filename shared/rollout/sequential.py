"""The always-valid decision of a canary rollout from live thumbs and battles.

Pure functions on counts and summaries: no database, no clock, nothing from the server or the
trainer, so the admin page, the rollout loop and the benchmarks all decide with the same code.

    >>> d = decide_rollout(ThumbCounts(ups=240, downs=360), ThumbCounts(ups=330, downs=270))
    >>> d.decision, round(d.thumbs.lower, 3), round(d.thumbs.upper, 3)
    ('promote', 0.055, 0.245)

**Thumbs test.** The difference of thumbs-up rates, canary minus active, is tested with a
mixture sequential probability ratio test (mSPRT; Johari, Koomen, Pekelis and Walsh, "Always
Valid Inference: Continuous Monitoring of A/B Tests"). With the estimate ``d`` and its plug-in
variance ``V`` (the larger of ``p_c (1 - p_c) / n_c + p_a (1 - p_a) / n_a`` and the pooled
``p (1 - p) (1 / n_c + 1 / n_a)``), the likelihood ratio of a normal mixture
``N(theta0, tau^2)`` over the true difference against the point null ``theta0`` is

    Lambda(theta0) = sqrt(V / (V + tau^2)) * exp(tau^2 (d - theta0)^2 / (2 V (V + tau^2)))

Under the null it is (asymptotically) a non-negative martingale of mean 1, so by Ville's
inequality it ever reaches ``1 / alpha`` with probability at most ``alpha``: the test may be
read after every vote. The values of ``theta0`` it does not reject form an always-valid
confidence sequence, ``d +- sqrt(V (V + tau^2) / tau^2 * (2 log(1/alpha) + log(1 + tau^2/V)))``,
the boundary that Waudby-Smith, Arbour, Sinha, Kennedy and Ramdas ("Time-uniform central limit
theory and asymptotic confidence sequences") justify with an estimated variance. The null is
``theta0 = -margin``: the canary is *better* (non-inferior) when the whole interval lies above
``-margin`` and *worse* when it lies below. ``tau`` (``mixture_sd``) is the effect size the test
is most sensitive to.

**Battle test.** Pairwise battles between the two versions give wins and losses of the canary
(ties say neither is better and are left out). Its win rate is tested against
``0.5 - win_rate_margin`` with Robbins' beta-binomial mixture (Robbins, "Statistical methods
related to the law of the iterated logarithm"; Howard, Ramdas, McAuliffe and Sekhon,
"Time-uniform, nonparametric, nonasymptotic confidence sequences"): the ratio of the
``Beta(a, a)`` marginal likelihood to ``q0^w (1 - q0)^l`` is an exact martingale under
``q = q0``, so no normal approximation is involved.

**Combination rule (Bonferroni).** ``alpha`` is split in advance: the battle test gets
``alpha * battle_alpha_share``, the thumbs test the rest (all of it when the share is 0). Both
are read at every look once each arm has ``min_ratings_per_arm`` thumbs:

- either test finds the canary worse -> ``rollback`` (harm on any signal ends the canary);
- otherwise either test finds it better -> ``promote``, unless a guard vetoes it, which turns
  the decision into ``rollback``;
- otherwise, once both arms have ``max_ratings_per_arm`` thumbs -> ``stop_cap`` (the active
  stays; the canary is not promoted); else ``continue``.

By the union bound the chance that either test ever makes a false claim is at most
``alpha_thumbs + alpha_battles = alpha``, however often the decision is read.

Guards (:mod:`shared.rollout.guards`), the arena leaderboard (:mod:`shared.rollout.arena`)
and the simulation (:mod:`shared.rollout.simulate`) live beside this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Decision = Literal["promote", "rollback", "continue", "stop_cap"]
Verdict = Literal["better", "worse", "undecided"]

# decision codes of the vectorised core, shared by decide_rollout and the simulation
_CONTINUE, _PROMOTE, _ROLLBACK, _STOP_CAP = 0, 1, 2, 3
_DECISIONS: dict[int, Decision] = {
    _CONTINUE: "continue",
    _PROMOTE: "promote",
    _ROLLBACK: "rollback",
    _STOP_CAP: "stop_cap",
}
_VERDICTS: dict[int, Verdict] = {1: "better", -1: "worse", 0: "undecided"}


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _check_rate(name: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


@dataclass(frozen=True, slots=True)
class ThumbCounts:
    """Thumbs on one version's answers since the canary started."""

    ups: int
    downs: int

    def __post_init__(self) -> None:
        _check_count("ups", self.ups)
        _check_count("downs", self.downs)

    @property
    def n(self) -> int:
        return self.ups + self.downs


@dataclass(frozen=True, slots=True)
class BattleCounts:
    """Battles between canary and active, counted from the canary's side."""

    wins: int = 0
    losses: int = 0
    ties: int = 0

    def __post_init__(self) -> None:
        _check_count("wins", self.wins)
        _check_count("losses", self.losses)
        _check_count("ties", self.ties)


@dataclass(frozen=True, slots=True)
class RolloutConfig:
    """How sure, how far and how long: the knobs of :func:`decide_rollout`."""

    alpha: float = 0.05  # chance of any false promote/rollback, over all looks
    margin: float = 0.0  # non-inferiority: promote a canary not worse than this in thumbs rate
    min_ratings_per_arm: int = 50  # thumbs per arm before any decision
    max_ratings_per_arm: int = 5000  # volume cap: thumbs per arm before giving up
    mixture_sd: float = 0.1  # tau of the thumbs test: the rate difference it detects best
    battle_alpha_share: float = 0.5  # Bonferroni share of alpha for battles (0: thumbs only)
    win_rate_margin: float = 0.0  # non-inferiority margin on the win rate below 0.5
    battle_mixture_sd: float = 0.1  # spread of the Beta(a, a) mixture around a 0.5 win rate

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"margin must be in [0, 1), got {self.margin!r}")
        if isinstance(self.min_ratings_per_arm, bool) or self.min_ratings_per_arm < 1:
            raise ValueError(f"min_ratings_per_arm must be >= 1, got {self.min_ratings_per_arm!r}")
        if self.max_ratings_per_arm < self.min_ratings_per_arm:
            raise ValueError(
                f"max_ratings_per_arm ({self.max_ratings_per_arm}) must be >= "
                f"min_ratings_per_arm ({self.min_ratings_per_arm})"
            )
        if not self.mixture_sd > 0.0:
            raise ValueError(f"mixture_sd must be > 0, got {self.mixture_sd!r}")
        if not 0.0 <= self.battle_alpha_share < 1.0:
            raise ValueError(
                f"battle_alpha_share must be in [0, 1), got {self.battle_alpha_share!r}"
            )
        if not 0.0 <= self.win_rate_margin < 0.5:
            raise ValueError(f"win_rate_margin must be in [0, 0.5), got {self.win_rate_margin!r}")
        if not 0.0 < self.battle_mixture_sd < 0.5:
            raise ValueError(
                f"battle_mixture_sd must be in (0, 0.5), got {self.battle_mixture_sd!r}"
            )

    @property
    def thumbs_alpha(self) -> float:
        return self.alpha * (1.0 - self.battle_alpha_share)

    @property
    def battle_alpha(self) -> float:
        return self.alpha * self.battle_alpha_share

    @property
    def battle_prior(self) -> float:
        """``a`` of the symmetric Beta(a, a) whose standard deviation is battle_mixture_sd."""
        return (1.0 / (4.0 * self.battle_mixture_sd**2) - 1.0) / 2.0


@dataclass(frozen=True, slots=True)
class ArmRate:
    """One version's thumbs-up rate with its always-valid interval (for display)."""

    ups: int
    downs: int
    rate: float | None
    lower: float
    upper: float


@dataclass(frozen=True, slots=True)
class SequentialTestState:
    """Where one always-valid test stands: estimate, interval, statistic and verdict."""

    name: Literal["thumbs", "battles"]
    n: int  # observations the test has seen (thumbs on both arms, or decisive battles)
    estimate: float | None  # rate difference, or canary win rate; None before any data
    lower: float
    upper: float
    null_value: float  # -margin, or 0.5 - win_rate_margin
    alpha: float  # this test's share of the overall alpha
    log_likelihood_ratio: float  # log mixture likelihood ratio against null_value
    log_threshold: float  # log(1 / alpha): the verdict is reached at or above it
    verdict: Verdict


@dataclass(frozen=True, slots=True)
class Veto:
    """A guard that blocks promotion, with the numbers behind it."""

    guard: str
    reason: str
    active: float
    canary: float
    limit: float


@dataclass(frozen=True, slots=True)
class RolloutDecision:
    """The decision and all the evidence the admin page shows and the policies table keeps."""

    decision: Decision
    reason: str
    active: ArmRate
    canary: ArmRate
    thumbs: SequentialTestState
    battles: SequentialTestState | None  # None when battles carry no share of alpha
    vetoes: tuple[Veto, ...]


# ---------------------------------------------------------------------------------------------
# vectorised core: every function takes arrays so the simulation reads the same test per vote


def _thumbs_stats(
    ups_a: np.ndarray, n_a: np.ndarray, ups_c: np.ndarray, n_c: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rate difference and its variance: the larger of the per-arm (unpooled) and the pooled
    estimate, rates shrunk by one up and one down so that a unanimous arm still varies."""
    ups_a, n_a, ups_c, n_c = (np.asarray(x, dtype=float) for x in (ups_a, n_a, ups_c, n_c))
    inv_a, inv_c = 1.0 / np.maximum(n_a, 1.0), 1.0 / np.maximum(n_c, 1.0)
    diff = ups_c * inv_c - ups_a * inv_a
    pa, pc = (ups_a + 1.0) / (n_a + 2.0), (ups_c + 1.0) / (n_c + 2.0)
    pooled = (ups_a + ups_c + 1.0) / (n_a + n_c + 2.0)
    unpooled = pa * (1.0 - pa) * inv_a + pc * (1.0 - pc) * inv_c
    # a small arm with few ups understates its own variance; the pooled one is right under the
    # null, so the larger keeps early looks from false alarms without costing power later
    return diff, np.maximum(unpooled, pooled * (1.0 - pooled) * (inv_a + inv_c))


def _normal_mixture_log_lr(
    diff: np.ndarray, var: np.ndarray, theta0: float, tau: float
) -> np.ndarray:
    t2 = tau * tau
    return 0.5 * np.log(var / (var + t2)) + t2 * (diff - theta0) ** 2 / (2.0 * var * (var + t2))


def _normal_mixture_radius(var: np.ndarray, tau: float, alpha: float) -> np.ndarray:
    t2 = tau * tau
    return np.sqrt(var * (var + t2) / t2 * (2.0 * math.log(1.0 / alpha) + np.log1p(t2 / var)))


def _log_rising(a: float, k: np.ndarray) -> np.ndarray:
    """``log Gamma(a + k) - log Gamma(a)`` for integer ``k >= 0`` (scipy is not a dependency)."""
    k = np.asarray(k, dtype=np.int64)
    steps = np.log(a + np.arange(int(k.max(initial=0)), dtype=float))
    return np.concatenate(([0.0], np.cumsum(steps)))[k]


def _beta_mixture_log_marginal(wins: np.ndarray, losses: np.ndarray, a: float) -> np.ndarray:
    """log of the Beta(a, a)-mixture probability of one sequence with these wins and losses."""
    wins, losses = np.asarray(wins, dtype=np.int64), np.asarray(losses, dtype=np.int64)
    return _log_rising(a, wins) + _log_rising(a, losses) - _log_rising(2.0 * a, wins + losses)


def _beta_mixture_log_lr(wins: np.ndarray, losses: np.ndarray, q0: float, a: float) -> np.ndarray:
    log_null = np.asarray(wins) * math.log(q0) + np.asarray(losses) * math.log1p(-q0)
    return _beta_mixture_log_marginal(wins, losses, a) - log_null


def _verdicts(
    ups_a: np.ndarray,
    n_a: np.ndarray,
    ups_c: np.ndarray,
    n_c: np.ndarray,
    wins: np.ndarray,
    losses: np.ndarray,
    config: RolloutConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """+1 better, -1 worse, 0 undecided, for the thumbs test and the battle test."""
    diff, var = _thumbs_stats(ups_a, n_a, ups_c, n_c)
    llr = _normal_mixture_log_lr(diff, var, -config.margin, config.mixture_sd)
    thumbs = np.where(llr >= math.log(1.0 / config.thumbs_alpha), np.sign(diff + config.margin), 0)
    if config.battle_alpha_share == 0.0:
        return thumbs.astype(np.int8), np.zeros_like(thumbs, dtype=np.int8)
    q0 = 0.5 - config.win_rate_margin
    wins, losses = np.asarray(wins), np.asarray(losses)
    b_llr = _beta_mixture_log_lr(wins, losses, q0, config.battle_prior)
    # the log ratio is convex in q0, least at the observed win rate: its side gives the direction
    side = np.sign(wins - q0 * (wins + losses))
    battles = np.where(b_llr >= math.log(1.0 / config.battle_alpha), side, 0)
    return thumbs.astype(np.int8), battles.astype(np.int8)


def _combine(
    thumbs: np.ndarray,
    battles: np.ndarray,
    n_a: np.ndarray,
    n_c: np.ndarray,
    config: RolloutConfig,
) -> np.ndarray:
    """The combination rule of the module docstring, as decision codes."""
    n_min = np.minimum(n_a, n_c)
    ready = n_min >= config.min_ratings_per_arm
    worse = ready & ((thumbs < 0) | (battles < 0))
    better = ready & ~worse & ((thumbs > 0) | (battles > 0))
    capped = n_min >= config.max_ratings_per_arm
    code = np.where(capped, _STOP_CAP, _CONTINUE)
    code = np.where(better, _PROMOTE, code)
    return np.where(worse, _ROLLBACK, code).astype(np.int8)


# ---------------------------------------------------------------------------------------------
# the decision, for one look


def _beta_mixture_interval(wins: int, losses: int, a: float, alpha: float) -> tuple[float, float]:
    """The rates not rejected by the Beta(a, a)-mixture test at level alpha (by bisection)."""
    threshold = math.log(1.0 / alpha)
    log_m = float(_beta_mixture_log_marginal(np.array(wins), np.array(losses), a))

    def log_lr(q: float) -> float:
        won = wins * math.log(q) if wins else 0.0
        lost = losses * math.log1p(-q) if losses else 0.0
        return log_m - won - lost

    centre = wins / (wins + losses) if wins + losses else 0.5

    def crossing(inside: float, outside: float) -> float:
        for _ in range(60):
            mid = (inside + outside) / 2.0
            inside, outside = (inside, mid) if log_lr(mid) >= threshold else (mid, outside)
        return inside

    # with no wins (losses) the ratio stays below the threshold all the way to 0 (1)
    lower = 0.0 if wins == 0 else crossing(centre, 0.0)
    upper = 1.0 if losses == 0 else crossing(centre, 1.0)
    return lower, upper


def _arm_rate(counts: ThumbCounts, alpha: float) -> ArmRate:
    lower, upper = _beta_mixture_interval(counts.ups, counts.downs, 1.0, alpha)
    rate = counts.ups / counts.n if counts.n else None
    return ArmRate(counts.ups, counts.downs, rate, lower, upper)


def _thumbs_state(
    active: ThumbCounts, canary: ThumbCounts, verdict: int, config: RolloutConfig
) -> SequentialTestState:
    alpha, tau = config.thumbs_alpha, config.mixture_sd
    diff, var = _thumbs_stats(
        np.array(active.ups), np.array(active.n), np.array(canary.ups), np.array(canary.n)
    )
    empty = active.n == 0 or canary.n == 0
    radius = float(_normal_mixture_radius(var, tau, alpha))
    llr = float(_normal_mixture_log_lr(diff, var, -config.margin, tau))
    return SequentialTestState(
        name="thumbs",
        n=active.n + canary.n,
        estimate=None if empty else float(diff),
        lower=-1.0 if empty else max(-1.0, float(diff) - radius),
        upper=1.0 if empty else min(1.0, float(diff) + radius),
        null_value=0.0 - config.margin,  # 0.0 - keeps a zero margin from printing as -0.0
        alpha=alpha,
        log_likelihood_ratio=0.0 if empty else llr,
        log_threshold=math.log(1.0 / alpha),
        verdict=_VERDICTS[verdict],
    )


def _battle_state(
    battles: BattleCounts, verdict: int, config: RolloutConfig
) -> SequentialTestState:
    alpha, a, q0 = config.battle_alpha, config.battle_prior, 0.5 - config.win_rate_margin
    wins, losses = battles.wins, battles.losses
    lower, upper = _beta_mixture_interval(wins, losses, a, alpha)
    return SequentialTestState(
        name="battles",
        n=wins + losses,
        estimate=wins / (wins + losses) if wins + losses else None,
        lower=lower,
        upper=upper,
        null_value=q0,
        alpha=alpha,
        log_likelihood_ratio=float(_beta_mixture_log_lr(np.array(wins), np.array(losses), q0, a)),
        log_threshold=math.log(1.0 / alpha),
        verdict=_VERDICTS[verdict],
    )


def _reason(
    code: int,
    active: ThumbCounts,
    canary: ThumbCounts,
    tests: list[SequentialTestState],
    vetoes: Sequence[Veto],
    config: RolloutConfig,
) -> str:
    def said(verdict: Verdict) -> str:
        return " and ".join(
            f"{t.name} [{t.lower:+.3f}, {t.upper:+.3f}] vs {t.null_value:+.3f}"
            for t in tests
            if t.verdict == verdict
        )

    n_min = min(active.n, canary.n)
    if n_min < config.min_ratings_per_arm:
        return f"waiting: {n_min} of {config.min_ratings_per_arm} ratings on the smaller arm"
    if code == _ROLLBACK and not said("worse"):
        return f"canary better ({said('better')}) but vetoed: " + "; ".join(
            v.reason for v in vetoes
        )
    if code == _ROLLBACK:
        return f"canary worse at alpha {config.alpha:g}: {said('worse')}"
    if code == _PROMOTE:
        return f"canary better at alpha {config.alpha:g}: {said('better')}"
    if code == _STOP_CAP:
        return f"cap of {config.max_ratings_per_arm} ratings per arm reached without a verdict"
    return "no verdict yet: every interval still contains its null value"


def decide_rollout(
    active: ThumbCounts,
    canary: ThumbCounts,
    battles: BattleCounts | None = None,
    config: RolloutConfig | None = None,
    vetoes: Sequence[Veto] = (),
) -> RolloutDecision:
    """Promote, roll back, continue or stop at the cap, from the evidence so far.

    Safe to call after every vote (see the module docstring for the test and the combination
    rule). ``battles`` is None when none were fought yet; ``vetoes`` come from
    :func:`guard_vetoes` and turn a promotion into a rollback.
    """
    config = config or RolloutConfig()
    battles = battles or BattleCounts()
    n_a, n_c = np.array(active.n), np.array(canary.n)
    thumbs, fights = _verdicts(
        np.array(active.ups),
        n_a,
        np.array(canary.ups),
        n_c,
        np.array(battles.wins),
        np.array(battles.losses),
        config,
    )
    code = int(_combine(thumbs, fights, n_a, n_c, config))
    if code == _PROMOTE and vetoes:
        code = _ROLLBACK
    ready = min(active.n, canary.n) >= config.min_ratings_per_arm
    tests = [_thumbs_state(active, canary, int(thumbs) if ready else 0, config)]
    if config.battle_alpha_share > 0.0:
        tests.append(_battle_state(battles, int(fights) if ready else 0, config))
    return RolloutDecision(
        decision=_DECISIONS[code],
        reason=_reason(code, active, canary, tests, vetoes, config),
        active=_arm_rate(active, config.alpha),
        canary=_arm_rate(canary, config.alpha),
        thumbs=tests[0],
        battles=tests[1] if len(tests) > 1 else None,
        vetoes=tuple(vetoes),
    )
