"""Canary rollouts decided by live feedback: the always-valid sequential test and its
decision (:mod:`.sequential`), the guards that veto a promotion (:mod:`.guards`), the arena
leaderboard (:mod:`.arena`) and simulated rollouts (:mod:`.simulate`)."""

from shared.rollout.arena import Battle, LeaderboardRow, arena_leaderboard, bradley_terry_ratings
from shared.rollout.guards import GuardConfig, VersionSummary, guard_vetoes
from shared.rollout.sequential import (
    ArmRate,
    BattleCounts,
    RolloutConfig,
    RolloutDecision,
    SequentialTestState,
    ThumbCounts,
    Veto,
    decide_rollout,
)
from shared.rollout.simulate import SimulationSummary, simulate_rollouts

__all__ = [
    "ArmRate",
    "Battle",
    "BattleCounts",
    "GuardConfig",
    "LeaderboardRow",
    "RolloutConfig",
    "RolloutDecision",
    "SequentialTestState",
    "SimulationSummary",
    "ThumbCounts",
    "VersionSummary",
    "Veto",
    "arena_leaderboard",
    "bradley_terry_ratings",
    "decide_rollout",
    "guard_vetoes",
    "simulate_rollouts",
]
