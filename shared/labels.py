"""Labels users put on answers beyond a thumb (Open-Assistant's: harmful, untrue, spam, ...),
one vote per user, message and label, with an optional note."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import col, select

from shared.db import session
from shared.schema import LABELS, Label, Message, utcnow
from shared.store import REASON_MAX, Invalid, NotFound
from shared.votes import own_choices, upsert


def record_labels(
    engine: Engine,
    *,
    user_id: int,
    completion_id: str,
    choice_index: int,
    labels: Sequence[str],
    note: str | None = None,
) -> dict[str, Any]:
    """Record the user's ``labels`` on one choice (a label given again keeps one vote and takes
    the new note); return every label the user has on it."""
    unknown = sorted(set(labels) - set(LABELS))
    if not labels or unknown:
        raise Invalid(f"labels must be some of {', '.join(LABELS)}; got {unknown or 'none'}")
    note = (note or "").strip() or None
    if note is not None and len(note) > REASON_MAX:
        raise Invalid(f"note is longer than {REASON_MAX} characters")
    if "\x00" in completion_id:
        raise NotFound(f"choice {choice_index} of {completion_id} not found")
    with session(engine) as s:
        target = s.exec(
            own_choices(user_id, completion_id).where(col(Message.choice_index) == choice_index)
        ).first()
        if target is None:
            raise NotFound(f"choice {choice_index} of {completion_id} not found")
        now = utcnow()
        for label in dict.fromkeys(labels):
            values = {"note": note, "updated_at": now}
            stmt = upsert(s)(Label.__table__).values(  # type: ignore[attr-defined]
                message_id=target.id, user_id=user_id, label=label, created_at=now, **values
            )
            s.execute(
                stmt.on_conflict_do_update(
                    index_elements=["message_id", "user_id", "label"], set_=values
                )
            )
        rows = s.exec(
            select(Label).where(Label.message_id == target.id, Label.user_id == user_id)
        ).all()
        return {
            "message_id": target.id,
            "completion_id": completion_id,
            "choice_index": choice_index,
            "labels": sorted(r.label for r in rows),
            "note": note,
            "policy_version": target.policy_version,
        }
