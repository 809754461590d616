"""Policy lifecycle in the ``policies`` table: register, activate, roll back, list.

The registry holds the bytes; this table says which version serves. Exactly one row is
``active``; activating another retires it. The server polls :func:`active_version` and
hot-swaps when it changes, so an activation by any gateway or by the trainer reaches all.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from shared.checkpoints import CheckpointError, PolicyRegistry
from shared.db import session
from shared.moderation import is_refusal
from shared.schema import Label, Message, Policy, utcnow
from shared.store import NotFound
from shared.votes import feedback_summary


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


SAFETY_WINDOW = 5_000  # the newest replies the live safety rates are counted on


def safety_summary(engine: Engine, newest: int = SAFETY_WINDOW) -> dict[str, dict[str, Any]]:
    """Per policy version, over its replies among the ``newest`` logged ones: how many were
    moderated, the shares whose request was flagged and blocked (answered by the server's
    refusal), the share of the flagged requests it answered itself that it refused
    (``refusal_rate``), the share of the other requests it refused (``over_refusal_rate``),
    the share moderation cut (``filtered_rate``), and users' labels by name."""
    with session(engine) as s:
        rows = s.exec(
            select(  # type: ignore[call-overload]  # sqlmodel types select() up to 4 columns
                Message.id,
                Message.policy_version,
                Message.content,
                Message.moderation,
                Message.finish_reason,
            )
            .where(Message.role == "assistant")
            .order_by(col(Message.id).desc())
            .limit(newest)
        ).all()
        ids = [r[0] for r in rows]
        labels = s.exec(
            select(Message.policy_version, Label.label, func.count(col(Label.id)))
            .join(Message, col(Message.id) == Label.message_id)
            .where(col(Message.id) >= (min(ids) if ids else 0))
            .group_by(Message.policy_version, Label.label)
        ).all()
    counts: dict[str, dict[str, int]] = {}
    for _, version, content, moderation, finish in rows:
        c = counts.setdefault(version or "unknown", dict.fromkeys(_SAFETY_COUNTS, 0))
        c["replies"] += 1
        c["filtered"] += finish == "content_filter"
        if not moderation:
            continue
        checked = moderation.get("input") or {}
        c["moderated"] += 1
        c["flagged"] += bool(checked.get("flagged"))
        if checked.get("action") == "block":  # the server refused: nothing the policy said
            c["blocked"] += 1
            continue
        refused = is_refusal(content or "")
        key = "flagged" if checked.get("flagged") else "other"
        c[f"{key}_answered"] += 1
        c[f"{key}_refused"] += refused
    by_label: dict[str, dict[str, int]] = {}
    for version, label, n in labels:
        by_label.setdefault(version or "unknown", {})[label] = int(n)
    out = {}
    for version in set(counts) | set(by_label):
        c = counts.get(version, dict.fromkeys(_SAFETY_COUNTS, 0))
        out[version] = {
            "moderated": c["moderated"],
            "flagged_rate": _share(c["flagged"], c["moderated"]),
            "blocked_rate": _share(c["blocked"], c["moderated"]),
            "refusal_rate": _share(c["flagged_refused"], c["flagged_answered"]),
            "over_refusal_rate": _share(c["other_refused"], c["other_answered"]),
            "filtered_rate": _share(c["filtered"], c["replies"]),
            "labels": dict(sorted(by_label.get(version, {}).items())),
        }
    return out


_SAFETY_COUNTS = (
    "replies", "filtered", "moderated", "flagged", "blocked",
    "flagged_answered", "flagged_refused", "other_answered", "other_refused",
)  # fmt: skip


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _heldout_safety(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """The gate's held-out refusal and over-refusal rates of a trainer-made version."""
    candidate = ((metrics or {}).get("gate") or {}).get("candidate") or {}
    return {
        "heldout_refusal_rate": candidate.get("refusal_rate"),
        "heldout_over_refusal": candidate.get("over_refusal"),
    }


def list_policies(engine: Engine, registry: PolicyRegistry) -> list[dict[str, Any]]:
    """Every known version with status, parent, metrics, its feedback counts and its safety
    figures (live from the log, and held-out from its gate)."""
    for version in registry.versions():
        register_version(engine, registry, version)
    summary = feedback_summary(engine)
    safety = safety_summary(engine)
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
                "canary_share": row.canary_share,
                "canary_started_at": row.canary_started_at,
                "decision": row.decision,
                "metrics": row.metrics,
                "feedback_count": fb["count"],
                "thumbs_up": fb["up"],
                "thumbs_down": fb["down"],
                "thumbs_up_rate": fb["up_rate"],
                "safety": {**safety.get(row.version, {}), **_heldout_safety(row.metrics)},
            }
        )
    return out
