"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=5"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A freshly created, uniquely named PostgreSQL database, dropped at teardown.

    Outside CI an unreachable server skips the test; in CI (``CI=true``) it fails it, so a
    green CI run always means the PostgreSQL tests ran.
    """
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
