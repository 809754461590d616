"""Votes on answers: a user's thumbs (with an optional reason) and rankings of a
completion's choices, one current vote per user, replaced when cast again; and the
per-version summary of them the admin page shows. Labels are in :mod:`shared.labels`.

A ranking may list all choices of a completion or a subset of at least two (unlisted choices
stay unranked); indices must be distinct."""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, func
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from shared.db import session
from shared.schema import Conversation, Feedback, Message, Ranking, utcnow
from shared.store import REASON_MAX, Invalid, NotFound


def upsert(s: Session) -> Any:
    """The dialect's INSERT construct with ``on_conflict_do_update``."""
    name = s.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert
    if name == "sqlite":
        return sqlite.insert
    raise NotImplementedError(f"upsert not supported on {name}")


def own_choices(user_id: int, completion_id: str) -> Any:
    """The choices of a completion in one of the user's live conversations."""
    return (
        select(Message)
        .join(Conversation, col(Conversation.id) == Message.conversation_id)
        .where(
            Message.completion_id == completion_id,
            Conversation.user_id == user_id,
            col(Conversation.deleted_at).is_(None),
        )
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def record_feedback(
    engine: Engine,
    *,
    user_id: int,
    completion_id: str,
    choice_index: int,
    rating: int,
    reason: str | None = None,
) -> dict[str, Any]:
    """Record (or replace) the user's thumbs up (+1) or down (-1) on one choice."""
    if not _is_int(rating) or rating not in (-1, 1):
        raise Invalid("rating must be 1 or -1")
    reason = (reason or "").strip() or None
    if reason is not None and len(reason) > REASON_MAX:
        raise Invalid(f"reason is longer than {REASON_MAX} characters")
    if "\x00" in completion_id:  # cannot exist; PostgreSQL refuses NUL in a text parameter
        raise NotFound(f"choice {choice_index} of {completion_id} not found")
    with session(engine) as s:
        message = s.exec(
            own_choices(user_id, completion_id).where(Message.choice_index == choice_index)
        ).first()
        if message is None:
            raise NotFound(f"choice {choice_index} of {completion_id} not found")
        now = utcnow()
        values = {"rating": rating, "reason": reason, "updated_at": now}
        # SQLModel sets __table__ on table classes; its stubs do not declare it
        stmt = upsert(s)(Feedback.__table__).values(  # type: ignore[attr-defined]
            message_id=message.id, user_id=user_id, created_at=now, **values
        )
        s.execute(stmt.on_conflict_do_update(index_elements=["message_id", "user_id"], set_=values))
        row = s.exec(
            select(Feedback).where(Feedback.message_id == message.id, Feedback.user_id == user_id)
        ).one()
        s.refresh(row)
        return {
            "id": row.id,
            "message_id": row.message_id,
            "completion_id": completion_id,
            "choice_index": choice_index,
            "rating": row.rating,
            "reason": row.reason,
            "policy_version": message.policy_version,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
        }


def record_ranking(
    engine: Engine, *, user_id: int, completion_id: str, ranking: list[int]
) -> dict[str, Any]:
    """Record (or replace) the user's ordering, best first, of a completion's choices."""
    if not isinstance(ranking, list) or not all(_is_int(i) for i in ranking):
        raise Invalid("ranking must be a list of choice indices")
    if "\x00" in completion_id:  # cannot exist; PostgreSQL refuses NUL in a text parameter
        raise NotFound(f"completion {completion_id} not found")
    with session(engine) as s:
        choices = s.exec(own_choices(user_id, completion_id)).all()
        if not choices:
            raise NotFound(f"completion {completion_id} not found")
        by_index = {m.choice_index: m.id for m in choices}
        if len(ranking) < 2 or len(set(ranking)) != len(ranking):
            raise Invalid("ranking must list at least two distinct choice indices")
        if not set(ranking) <= by_index.keys():
            raise Invalid(f"ranking must use choice indices of {completion_id}: {sorted(by_index)}")
        ids = [by_index[i] for i in ranking]
        stmt = upsert(s)(Ranking.__table__).values(  # type: ignore[attr-defined]
            completion_id=completion_id, user_id=user_id, ranking=ids, created_at=utcnow()
        )
        s.execute(
            stmt.on_conflict_do_update(
                index_elements=["completion_id", "user_id"], set_={"ranking": ids}
            )
        )
        row = s.exec(
            select(Ranking).where(
                Ranking.completion_id == completion_id, Ranking.user_id == user_id
            )
        ).one()
        s.refresh(row)
        return {
            "id": row.id,
            "completion_id": completion_id,
            "ranking": list(ranking),
            "message_ids": list(row.ranking),
            "created_at": row.created_at,
        }


def feedback_summary(engine: Engine) -> dict[str, dict[str, Any]]:
    """Votes per policy version: up, down, count and up_rate (``"unknown"`` if unversioned)."""
    up = func.sum(case((col(Feedback.rating) > 0, 1), else_=0))
    with session(engine) as s:
        rows = s.exec(
            select(Message.policy_version, up, func.count(col(Feedback.id)))
            .join(Message, col(Message.id) == Feedback.message_id)
            .group_by(Message.policy_version)
        ).all()
    return {
        version or "unknown": {
            "up": int(n_up),
            "down": int(n) - int(n_up),
            "count": int(n),
            "up_rate": int(n_up) / int(n),
        }
        for version, n_up, n in rows
    }
