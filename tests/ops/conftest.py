"""Fixtures of the operations kit tests: Prometheus' binaries and a live server with traffic.

Outside CI a missing ``prometheus`` / ``promtool`` (Debian package ``prometheus``) skips the
tests that need them; in CI (``CI=true``, where ``.ci/run`` installs it) it fails them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from shared.keys import create_key
from tests.conftest import chat_and_rate, live_app

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"


def unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI=true: the Prometheus tests must run)")
    pytest.skip(reason)


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed (apt-get install prometheus)")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return binary("promtool")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return binary("prometheus")


@pytest.fixture(scope="session")
def metrics_server(tmp_path_factory: pytest.TempPathFactory, tiny_seed_dir: Path):
    """A live server that has answered a chat and recorded a thumbs up, so its labelled
    counters have samples in /metrics."""
    with live_app(tmp_path_factory.mktemp("ops"), tiny_seed_dir, kv_cache_memory_mb=16) as live:
        chat_and_rate(live.url, create_key(live.state.db, "ops"), 1)
        yield live
