"""A database for a module-scoped live server: SQLite (the data dir's default) or a fresh
PostgreSQL database on the machine's server, dropped afterwards (unreachable PostgreSQL skips
the test outside CI and fails it in CI); and the settings such a server runs with."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from shared.config import Settings
from tests.conftest import fresh_postgres

DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@contextmanager
def database_url(kind: str) -> Iterator[str]:
    """``""`` (SQLite under the data dir) or the URL of a new PostgreSQL database."""
    if kind == "sqlite":
        yield ""
        return
    with fresh_postgres() as url:
        yield url


def live_settings(data_dir: Path, database_url: str, **overrides: Any) -> Settings:
    """A small KV cache and no rate limit: the tests send far more than a user's burst."""
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        kv_cache_memory_mb=16,
        rate_limit_per_minute=0,
        **overrides,
    )
