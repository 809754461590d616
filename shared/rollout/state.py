"""Canary state in the ``policies`` table: at most one version is ``canary`` beside the
``active`` one, with the share of users it serves; it ends promoted (``active``, the old
active ``retired``) or aborted (``rejected``), and the decision is recorded with the row.

Servers follow the table as they do for activation (:func:`canary_of`), and route each user
with :func:`routes_to_canary`: the same user, and so each of their conversations, stays on
one version for the whole rollout.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from shared.checkpoints import PolicyRegistry
from shared.db import session
from shared.policies import activate_row, active_version, register_version
from shared.schema import Policy, utcnow
from shared.store import Invalid, NotFound

__all__ = [
    "Canary",
    "abort_canary",
    "begin_canary_row",
    "canary_of",
    "promote_canary",
    "routes_to_canary",
    "start_canary",
]


@dataclass(frozen=True)
class Canary:
    version: str
    share: float
    started_at: datetime


def canary_of(engine: Engine) -> Canary | None:
    """The version now in canary, if any."""
    with session(engine) as s:
        row = s.exec(select(Policy).where(Policy.status == "canary")).first()
        if row is None or row.canary_share is None or row.canary_started_at is None:
            return None
        return Canary(row.version, row.canary_share, row.canary_started_at)


def start_canary(engine: Engine, registry: PolicyRegistry, version: str, share: float) -> Canary:
    """Serve ``version`` to ``share`` of users beside the active version. The version is
    verified first (``CheckpointError``), must share the active version's tokenizer (the
    gateway renders every prompt with one), and must not be active; a running canary of the
    same version gets the new share, one of another version is :class:`Invalid`."""
    if not 0 < share < 1:
        raise Invalid("share must be between 0 and 1 (exclusive)")
    if version not in registry.versions():
        raise NotFound(f"no policy version {version!r}")
    active = active_version(engine)
    if version == active:
        raise Invalid(f"{version} is the active version")
    registry.verify(version, deep=True)
    if active is not None and _tokenizer_bytes(registry, version) != _tokenizer_bytes(
        registry, active
    ):
        raise Invalid(f"{version} has another tokenizer than the active version {active}")
    register_version(engine, registry, version)
    with session(engine) as s:
        running = s.exec(select(Policy).where(Policy.status == "canary")).first()
        if running is not None and running.version != version:
            raise Invalid(f"{running.version} is already in canary: promote or abort it first")
        row = s.get(Policy, version)
        assert row is not None  # registered above
        row.status, row.canary_share, row.decision = "canary", share, None
        row.canary_started_at = row.canary_started_at if running is not None else utcnow()
        s.add(row)
        assert row.canary_started_at is not None
        return Canary(version, share, row.canary_started_at)


def begin_canary_row(s: Session, version: str, share: float) -> str | None:
    """In the caller's transaction (the trainer's publish), make ``version``, whose row
    exists and whose files were verified, the canary; a canary still running is aborted as
    superseded. Returns that superseded version."""
    superseded = None
    for row in s.exec(select(Policy).where(Policy.status == "canary")).all():
        if row.version != version:
            superseded = row.version
            row.status = "rejected"
            _end(s, row, "abort", {"by": "trainer", "reason": f"superseded by {version}"})
    target = s.get(Policy, version)
    if target is None:
        raise NotFound(f"no policy version {version!r}")
    target.status, target.canary_share, target.canary_started_at = "canary", share, utcnow()
    s.add(target)
    return superseded


def promote_canary(engine: Engine, version: str, decision: dict[str, Any]) -> str | None:
    """End the canary of ``version`` by making it the active version; the old active one is
    retired. ``decision`` (who decided, why, the evidence) is recorded with the row. Returns
    the version it replaced."""
    with session(engine) as s:
        _end(s, _canary_row(s, version), "promote", decision)
        return activate_row(s, version)


def abort_canary(engine: Engine, version: str, decision: dict[str, Any]) -> None:
    """End the canary of ``version``: it is ``rejected`` and every user is served the active
    version again; ``decision`` is recorded with the row."""
    with session(engine) as s:
        row = _canary_row(s, version)
        row.status = "rejected"
        _end(s, row, "abort", decision)


def routes_to_canary(canary: Canary, user: str) -> bool:
    """Whether ``user`` (an API key's id, or a request's ``user`` field) is served the canary:
    a hash of the user and the canary's version, so a user stays on one version through the
    rollout and each rollout draws its own users."""
    digest = hashlib.sha256(f"{canary.version}\0{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < canary.share


def _end(s: Session, row: Policy, action: str, decision: dict[str, Any]) -> None:
    """Record how ``row``'s canary ended; it serves no share any more."""
    row.canary_share = None
    row.decision = {**decision, "action": action, "at": utcnow().isoformat()}
    s.add(row)


def _canary_row(s: Session, version: str) -> Policy:
    row = s.get(Policy, version)
    if row is None:
        raise NotFound(f"no policy version {version!r}")
    if row.status != "canary":
        raise Invalid(f"{version} is not in canary (it is {row.status})")
    return row


def _tokenizer_bytes(registry: PolicyRegistry, version: str) -> bytes:
    return (registry.path(version) / "tokenizer.json").read_bytes()
