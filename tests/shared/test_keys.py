"""API keys: printed once, stored hashed, resolved to a user, revoked at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlmodel import select

from shared.db import init_db, session
from shared.keys import create_key, resolve_key, revoke_key
from shared.schema import ApiKey


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        return init_db(f"sqlite:///{tmp_path / 'k.db'}")
    return init_db(request.getfixturevalue("postgres_url"))


def test_key_resolves_to_its_user_and_only_its_hash_is_stored(engine) -> None:
    key = create_key(engine, "alice")
    admin = create_key(engine, "root", admin=True)
    alice = resolve_key(engine, key)
    assert alice is not None and alice.user_name == "alice" and not alice.is_admin
    assert resolve_key(engine, admin).is_admin
    with session(engine) as s:
        stored = s.exec(select(ApiKey)).all()
    assert all(key not in (row.key_hash, row.prefix) for row in stored)
    assert resolve_key(engine, key + "x") is None and resolve_key(engine, "") is None


def test_revoked_key_stops_working_at_once(engine) -> None:
    key = create_key(engine, "bob")
    other = create_key(engine, "bob")
    assert revoke_key(engine, key[:8]) == 1
    assert resolve_key(engine, key) is None
    assert resolve_key(engine, other) is not None
    with pytest.raises(ValueError):
        revoke_key(engine, "pc-")


def test_cli_keys_create_prints_a_working_key(tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "palmchat"]
    out = subprocess.run(
        [*cli, "keys", "create", "--user", "carol", "--admin", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    key = out.stdout.strip()
    principal = resolve_key(init_db(f"sqlite:///{tmp_path / 'palmchat.db'}"), key)
    assert principal is not None and principal.user_name == "carol" and principal.is_admin
    listed = subprocess.run(
        [*cli, "keys", "list", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "carol" in listed.stdout and key[:8] in listed.stdout and key not in listed.stdout
