"""A database for a module-scoped live server: SQLite (the data dir's default) or a fresh
PostgreSQL database on the machine's server, dropped afterwards. Same rules as the
``postgres_url`` fixture: unreachable PostgreSQL skips the test outside CI and fails it in CI."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.conftest import PG_ADMIN_DSN

DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@contextmanager
def database_url(kind: str) -> Iterator[str]:
    """``""`` (SQLite under the data dir) or the URL of a new PostgreSQL database."""
    if kind == "sqlite":
        yield ""
        return
    psycopg = pytest.importorskip("psycopg")
    name = f"palmchat_test_{uuid.uuid4().hex[:16]}"
    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at 127.0.0.1:5432 not reachable in CI: {exc}")
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 not reachable: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
