"""API keys: create (printed once, only the hash stored), resolve, revoke.

A key is ``pc-`` followed by 40 url-safe random characters. Lookups go by the key's SHA-256,
and the stored hash is compared again with ``hmac.compare_digest`` so the check does not leak
timing about how much of a guess was right.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from shared.db import session
from shared.schema import ApiKey, User, utcnow

KEY_PREFIX = "pc-"


@dataclass(frozen=True)
class Principal:
    """Who is calling: resolved from an API key."""

    user_id: int
    user_name: str
    key_id: int
    is_admin: bool


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(30)


def _user_named(s: Session, name: str) -> User:
    """The user called ``name``, created (and flushed, so it has an id) when new."""
    user = s.exec(select(User).where(User.name == name)).first()
    if user is None:
        user = User(name=name)
        s.add(user)
        s.flush()
    return user


def create_key(engine: Engine, user_name: str, *, admin: bool = False) -> str:
    """Create (or reuse) the user and a new key for them; return the key — shown only once."""
    user_name = user_name.strip()
    if not user_name or len(user_name) > 64:
        raise ValueError("user name must be 1-64 characters")
    key = new_key()
    with session(engine) as s:
        user = _user_named(s, user_name)
        assert user.id is not None  # flushed
        s.add(
            ApiKey(user_id=user.id, key_hash=ApiKey.hash_key(key), prefix=key[:8], is_admin=admin)
        )
    return key


def resolve_key(engine: Engine, key: str) -> Principal | None:
    """The principal for a live key, or None for an unknown or revoked one."""
    return resolve_keys(engine, [key])[0]


def resolve_keys(engine: Engine, keys: Sequence[str]) -> list[Principal | None]:
    """:func:`resolve_key` for each of ``keys``, in one query."""
    digests = [ApiKey.hash_key(k) if k and len(k) <= 200 else None for k in keys]
    wanted = {d for d in digests if d is not None}
    found: dict[str, tuple[str, Principal]] = {}  # by stored hash: (it, its principal)
    if wanted:
        with session(engine) as s:
            rows = s.exec(
                select(ApiKey, User)
                .join(User, col(User.id) == col(ApiKey.user_id))
                .where(col(ApiKey.key_hash).in_(wanted))
            ).all()
            for api_key, user in rows:
                if api_key.revoked_at is not None:
                    continue
                assert user.id is not None and api_key.id is not None  # rows read from the table
                found[api_key.key_hash] = (
                    api_key.key_hash,
                    Principal(
                        user_id=user.id,
                        user_name=user.name,
                        key_id=api_key.id,
                        is_admin=api_key.is_admin,
                    ),
                )
    out: list[Principal | None] = []
    for digest in digests:
        stored, principal = found.get(digest or "", ("", None))
        # found by the hash (the index did the lookup), compared again in constant time
        out.append(principal if digest and hmac.compare_digest(stored, digest) else None)
    return out


def revoke_key(engine: Engine, prefix: str) -> int:
    """Revoke every live key starting with ``prefix`` (at least 8 characters); return how many."""
    if len(prefix) < 8:
        raise ValueError("give at least the 8-character key prefix shown by `keys list`")
    with session(engine) as s:
        rows = s.exec(
            select(ApiKey).where(ApiKey.prefix == prefix[:8], col(ApiKey.revoked_at).is_(None))
        ).all()
        for row in rows:
            row.revoked_at = utcnow()
            s.add(row)
        return len(rows)


def list_keys(engine: Engine) -> list[tuple[str, str, bool, bool]]:
    """(user, prefix, is_admin, revoked) for every key."""
    with session(engine) as s:
        rows = s.exec(
            select(ApiKey, User)
            .join(User, col(User.id) == col(ApiKey.user_id))
            .order_by(col(ApiKey.id))
        ).all()
        return [(u.name, k.prefix, k.is_admin, k.revoked_at is not None) for k, u in rows]


def has_admin_key(engine: Engine) -> bool:
    with session(engine) as s:
        return (
            s.exec(
                select(ApiKey).where(
                    col(ApiKey.is_admin).is_(True), col(ApiKey.revoked_at).is_(None)
                )
            ).first()
            is not None
        )


def local_principal(engine: Engine, name: str = "local") -> Principal:
    """The admin principal used when auth is off (loopback only): a real user row, so the
    conversation log and feedback keep their foreign keys."""
    with session(engine) as s:
        user = _user_named(s, name)
        assert user.id is not None  # flushed
        return Principal(user_id=user.id, user_name=name, key_id=0, is_admin=True)
