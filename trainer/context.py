"""Where the trainer reads feedback and writes policies, and the named points where a test can
kill it (``PALMCHAT_TRAINER_CRASH_AT=<point>``)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine

from shared.checkpoints import PolicyRegistry
from shared.config import Settings

log = logging.getLogger(__name__)

CRASH_ENV = "PALMCHAT_TRAINER_CRASH_AT"
CRASH_POINTS = ("after_reward_model", "after_training", "after_publish", "before_commit")


def crash_point(name: str) -> None:
    """Die here, without any clean-up, if ``$PALMCHAT_TRAINER_CRASH_AT`` names this point."""
    if os.environ.get(CRASH_ENV) == name:
        log.warning("crash point %s reached: exiting", name)
        os._exit(86)


@dataclass
class TrainerContext:
    """Where the trainer reads feedback and writes policies."""

    engine: Engine
    registry: PolicyRegistry
    reward_root: Path

    @classmethod
    def from_settings(cls, settings: Settings) -> TrainerContext:
        from shared.bootstrap import prepare

        prepared = prepare(settings)
        return cls(prepared.engine, prepared.registry, settings.data_dir / "reward_models")
