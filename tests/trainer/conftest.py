"""Fixtures for the online trainer: a data dir holding a tiny policy and a simulated user."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_helpers import DataDir

from shared.checkpoints import PolicyRegistry
from shared.config import Settings
from shared.db import session
from shared.schema import User
from trainer.loop import TrainerContext


@pytest.fixture
def data_dir(tmp_path: Path, tiny_seed_dir: Path) -> DataDir:
    settings = Settings(data_dir=tmp_path / "data")
    PolicyRegistry(settings.registry_dir).install(tiny_seed_dir)
    ctx = TrainerContext.from_settings(settings)
    with session(ctx.engine) as s:
        user = User(name="sim")
        s.add(user)
        s.flush()
        user_id = user.id
    return DataDir(settings, ctx, user_id)
