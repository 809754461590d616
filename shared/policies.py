"""Policy lifecycle in the ``policies`` table: register, activate, roll back, list.

The registry holds the bytes; this table says which version serves. Exactly one row is
``active``; activating another retires it. The server polls :func:`active_version` and
hot-swaps when it changes, so an activation by any gateway or by the trainer reaches all.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from shared.checkpoints import CheckpointError, PolicyRegistry
from shared.db import session
from shared.schema import Policy, utcnow
from shared.store import NotFound, feedback_summary


def active_version(engine: Engine) -> str | None:
    with session(engine) as s:
        row = s.exec(
            select(Policy)
            .where(Policy.status == "active")
            .order_by(col(Policy.activated_at).desc())
        ).first()
        return row.version if row else None


def register_version(
    engine: Engine, registry: PolicyRegistry, version: str, status: str = "candidate"
) -> None:
    """Record a registry version in the table (no-op if it is already there)."""
    with session(engine) as s:
        add_version_row(s, registry, version, status)


def add_version_row(
    s: Session, registry: PolicyRegistry, version: str, status: str = "candidate"
) -> None:
    """:func:`register_version` in the caller's transaction."""
    if s.get(Policy, version) is not None:
        return
    manifest = registry.manifest(version)
    now = utcnow()
    s.add(
        Policy(
            version=version,
            status=status,
            parent_version=manifest.get("parent"),
            metrics=manifest.get("metrics", {}),
            created_at=now,
            activated_at=now if status == "active" else None,
        )
    )


def activate(engine: Engine, registry: PolicyRegistry, version: str) -> str | None:
    """Make ``version`` the active policy; return the version it replaced.

    The version is verified first (file hashes, and that config, tokenizer and weights fit
    together): a corrupt version is refused (CheckpointError) and the current one keeps
    serving.
    """
    if version not in registry.versions():
        raise NotFound(f"no policy version {version!r}")
    registry.verify(version, deep=True)
    register_version(engine, registry, version)
    with session(engine) as s:
        return activate_row(s, version)


def activate_row(s: Session, version: str) -> str | None:
    """:func:`activate` in the caller's transaction, for a version whose row exists and whose
    files were verified: retire the active row(s), activate ``version``; return the version it
    replaced."""
    now = utcnow()
    previous = None
    for row in s.exec(select(Policy).where(Policy.status == "active")).all():
        if row.version != version:
            previous = row.version
            row.status, row.retired_at = "retired", now
            s.add(row)
    target = s.get(Policy, version)
    if target is None:
        raise NotFound(f"no policy version {version!r}")
    if target.status != "active":
        target.status, target.activated_at, target.retired_at = "active", now, None
        s.add(target)
    return previous


def rollback(engine: Engine, registry: PolicyRegistry) -> tuple[str, str]:
    """Re-activate the most recently retired version; return (from, to)."""
    current = active_version(engine)
    with session(engine) as s:
        rows = s.exec(
            select(Policy)
            .where(Policy.status == "retired", col(Policy.activated_at).is_not(None))
            .order_by(col(Policy.activated_at).desc())
        ).all()
    for row in rows:
        try:
            activate(engine, registry, row.version)
        except CheckpointError:
            continue  # a damaged old version is skipped, never served
        return current or "", row.version
    raise NotFound("no earlier policy version to roll back to")


def list_policies(engine: Engine, registry: PolicyRegistry) -> list[dict[str, Any]]:
    """Every known version with status, parent, metrics and its feedback counts."""
    for version in registry.versions():
        register_version(engine, registry, version)
    summary = feedback_summary(engine)
    with session(engine) as s:
        rows = s.exec(select(Policy)).all()
    out = []
    for row in sorted(rows, key=lambda r: int(r.version[1:]) if r.version[1:].isdigit() else 0):
        fb = summary.get(row.version, {"up": 0, "down": 0, "count": 0, "up_rate": None})
        out.append(
            {
                "version": row.version,
                "status": row.status,
                "parent": row.parent_version,
                "created_at": row.created_at,
                "activated_at": row.activated_at,
                "retired_at": row.retired_at,
                "metrics": row.metrics,
                "feedback_count": fb["count"],
                "thumbs_up": fb["up"],
                "thumbs_down": fb["down"],
                "thumbs_up_rate": fb["up_rate"],
            }
        )
    return out
