"""A database for a module-scoped live server: SQLite (the data dir's default) or a fresh
PostgreSQL database on the machine's server, dropped afterwards (unreachable PostgreSQL skips
the test outside CI and fails it in CI)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

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
