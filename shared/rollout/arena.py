"""The arena leaderboard of policy versions from pairwise battles.

**Arena leaderboard** (:func:`arena_leaderboard`): Bradley-Terry strengths (Bradley and Terry,
1952; Hunter, "MM algorithms for generalized Bradley-Terry models") fitted by Newton's method
on the log-likelihood with a weak prior, ties counted as half a win to each side, on the
Elo-like scale of Chatbot Arena (Chiang et al., 2024): ``400 log10`` odds, mean 1000, with
percentile bootstrap intervals over resampled battles.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------------------------------------
# arena leaderboard

_ELO_PER_NAT = 400.0 / math.log(10.0)  # 400 points = tenfold odds, as in Elo and Chatbot Arena


@dataclass(frozen=True, slots=True)
class Battle:
    """One pairwise result between two versions (for a tie the order does not matter)."""

    winner: str
    loser: str
    tie: bool = False

    def __post_init__(self) -> None:
        if self.winner == self.loser:
            raise ValueError(f"a battle needs two different versions, got {self.winner!r} twice")


@dataclass(frozen=True, slots=True)
class LeaderboardRow:
    """One version on the leaderboard; rating and interval are None when it has no games."""

    version: str
    rating: float | None
    lower: float | None
    upper: float | None
    wins: int
    losses: int
    ties: int
    games: int


def _bt_log_strengths(wins: np.ndarray, prior_games: float) -> np.ndarray:
    """Bradley-Terry log strengths for a batch of win matrices ``(B, K, K)`` -> ``(B, K)``.

    ``wins[b, i, j]`` is what i scored against j (a tie half to each). Every version also plays
    ``prior_games`` drawn games against a fixed reference of strength 1: that keeps unbeaten
    and winless versions finite and ties disconnected groups to one scale. The penalised
    log-likelihood is concave, so Newton's method (logistic regression's IRLS) finds its
    maximum in a few steps, where minorisation-maximisation crawls along the weakly pinned
    common shift.
    """
    games = wins + np.swapaxes(wins, 1, 2)
    scored = wins.sum(axis=2) + prior_games / 2.0
    theta = np.zeros(scored.shape)
    for _ in range(100):
        win_prob = 1.0 / (1.0 + np.exp(theta[:, None, :] - theta[:, :, None]))
        vs_ref = 1.0 / (1.0 + np.exp(-theta))
        grad = scored - (games * win_prob).sum(axis=2) - prior_games * vs_ref
        curvature = games * win_prob * (1.0 - win_prob)
        hessian = (
            curvature
            - np.eye(theta.shape[1])
            * (curvature.sum(axis=2) + prior_games * vs_ref * (1.0 - vs_ref))[:, :, None]
        )
        step = np.linalg.solve(hessian, grad[:, :, None])[:, :, 0]
        # a bounded step keeps the first iterations from overshooting on lopsided records
        theta = theta - np.clip(step, -2.0, 2.0)
        if np.max(np.abs(step), initial=0.0) < 1e-10:
            break
    return theta


def _elo(log_p: np.ndarray, rated: np.ndarray) -> np.ndarray:
    """Elo-like ratings whose mean over the rated versions is 1000."""
    ratings = _ELO_PER_NAT * log_p
    if rated.any():
        ratings = ratings - ratings[:, rated].mean(axis=1, keepdims=True)
    return ratings + 1000.0


def _index_battles(
    battles: Iterable[Battle], versions: Iterable[str]
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Names, each distinct result's (winner, loser, tie) index columns, and its count."""
    counted: dict[tuple[str, str, bool], int] = {}
    for b in battles:
        counted[(b.winner, b.loser, b.tie)] = counted.get((b.winner, b.loser, b.tie), 0) + 1
    names = sorted(set(versions) | {v for key in counted for v in key[:2]})
    index = {v: i for i, v in enumerate(names)}
    keys = list(counted)
    winner = np.array([index[k[0]] for k in keys], dtype=np.int64)
    loser = np.array([index[k[1]] for k in keys], dtype=np.int64)
    tie = np.array([k[2] for k in keys], dtype=bool)
    sizes = np.array([counted[k] for k in keys], dtype=np.int64)
    return names, winner, loser, tie, sizes


def _win_matrices(
    counts: np.ndarray, winner: np.ndarray, loser: np.ndarray, tie: np.ndarray, k: int
) -> np.ndarray:
    """``(B, G)`` counts of the G distinct results -> ``(B, K, K)`` win matrices."""
    share = np.where(tie, 0.5, 1.0)
    cells = np.concatenate([winner * k + loser, (loser * k + winner)[tie]])
    weights = np.concatenate([counts * share, counts[:, tie] * 0.5], axis=1)
    batch = counts.shape[0]
    # one bincount over (resample, cell) pairs adds repeated cells correctly
    where = (np.arange(batch)[:, None] * (k * k) + cells[None, :]).ravel()
    flat = np.bincount(where, weights=weights.ravel(), minlength=batch * k * k)
    return flat.reshape(batch, k, k)


def bradley_terry_ratings(
    battles: Iterable[Battle], *, prior_games: float = 1.0
) -> dict[str, float]:
    """Elo-like Bradley-Terry rating of every version that played (mean 1000)."""
    rows = arena_leaderboard(battles, n_bootstrap=0, prior_games=prior_games)
    return {r.version: r.rating for r in rows if r.rating is not None}


def arena_leaderboard(
    battles: Iterable[Battle],
    versions: Iterable[str] = (),
    *,
    n_bootstrap: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    prior_games: float = 1.0,
) -> list[LeaderboardRow]:
    """Bradley-Terry leaderboard with percentile bootstrap intervals, best first.

    ``versions`` adds versions that may have no games yet: they are listed last, unrated.
    ``n_bootstrap=0`` skips the intervals (lower and upper are None).
    """
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if not prior_games > 0.0:
        raise ValueError(f"prior_games must be > 0, got {prior_games!r}")
    names, winner, loser, tie, sizes = _index_battles(battles, versions)
    k = len(names)
    wins = np.bincount(winner[~tie], weights=sizes[~tie], minlength=k).astype(int)
    losses = np.bincount(loser[~tie], weights=sizes[~tie], minlength=k).astype(int)
    ties = np.bincount(
        np.concatenate([winner[tie], loser[tie]]),
        minlength=k,
        weights=np.concatenate([sizes[tie], sizes[tie]]),
    ).astype(int)
    played = wins + losses + ties
    rated = played > 0

    def fit(counts: np.ndarray) -> np.ndarray:
        matrices = _win_matrices(counts, winner, loser, tie, k)
        return _elo(_bt_log_strengths(matrices, prior_games), rated)

    point = fit(sizes[None])[0]
    lower = upper = None
    if n_bootstrap and sizes.size:
        # resampling battles with replacement = a multinomial draw over the distinct results
        total = int(sizes.sum())
        counts = np.random.default_rng(seed).multinomial(total, sizes / total, size=n_bootstrap)
        boot = fit(counts)
        tail = 50.0 * (1.0 - confidence)
        lower, upper = np.percentile(boot, [tail, 100.0 - tail], axis=0)
    rows = [
        LeaderboardRow(
            version=name,
            rating=float(point[i]) if rated[i] else None,
            lower=float(lower[i]) if lower is not None and rated[i] else None,
            upper=float(upper[i]) if upper is not None and rated[i] else None,
            wins=int(wins[i]),
            losses=int(losses[i]),
            ties=int(ties[i]),
            games=int(played[i]),
        )
        for i, name in enumerate(names)
    ]
    return sorted(rows, key=lambda r: (r.rating is None, -(r.rating or 0.0), r.version))
