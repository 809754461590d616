"""Fixtures for the online trainer: a data dir holding a tiny policy and a simulated user."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_helpers import DataDir, make_data_dir


@pytest.fixture
def data_dir(tmp_path: Path, tiny_seed_dir: Path) -> DataDir:
    return make_data_dir(tmp_path / "data", tiny_seed_dir)
