"""The conversation log as Open-Assistant-style message trees (one JSON object per
conversation), with each message's thumbs (OA's ``emojis``) and labels.

A node: ``message_id``, ``parent_id``, ``text``, ``role`` (``prompter`` for the user,
``assistant``, ``system``), ``model_name`` (the policy version of an answer), ``emojis``
(``{"+1": ups, "-1": downs}``), ``labels`` (``{label: {"count": n, "notes": [...]}}``) and
``replies``. Deleted conversations are left out.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import col, select

from shared.db import session
from shared.schema import Conversation, Feedback, Label, Message

_ROLE = {"user": "prompter", "assistant": "assistant", "system": "system"}
_PAGE = 200  # conversations per query


def export_oasst(engine: Engine) -> Iterator[dict[str, Any]]:
    """One tree per live conversation, oldest conversation first."""
    after: str | None = None
    while True:
        with session(engine) as s:
            query = select(Conversation).where(col(Conversation.deleted_at).is_(None))
            if after is not None:
                query = query.where(col(Conversation.id) > after)
            convs = s.exec(query.order_by(col(Conversation.id)).limit(_PAGE)).all()
            if not convs:
                return
            ids = [c.id for c in convs]
            messages = s.exec(
                select(Message)
                .where(col(Message.conversation_id).in_(ids))
                .order_by(col(Message.id))
            ).all()
            mids = [m.id for m in messages]
            thumbs = s.exec(
                select(Feedback.message_id, Feedback.rating).where(
                    col(Feedback.message_id).in_(mids)
                )
            ).all()
            labels = s.exec(
                select(Label.message_id, Label.label, Label.note).where(
                    col(Label.message_id).in_(mids)
                )
            ).all()
            trees = _trees(convs, messages, thumbs, labels)
        yield from trees
        after = ids[-1]


def _trees(convs, messages, thumbs, labels) -> list[dict[str, Any]]:
    nodes: dict[int, dict[str, Any]] = {}
    for m in messages:
        nodes[m.id] = {
            "message_id": m.id,
            "parent_id": m.parent_id,
            "text": m.content,
            "role": _ROLE.get(m.role, m.role),
            "model_name": m.policy_version if m.role == "assistant" else None,
            "created_date": m.created_at.isoformat(),
            "emojis": {},
            "labels": {},
            "replies": [],
            "_conversation": m.conversation_id,
        }
    for message_id, rating in thumbs:
        emojis = nodes[message_id]["emojis"]
        key = "+1" if rating > 0 else "-1"
        emojis[key] = emojis.get(key, 0) + 1
    for message_id, label, note in labels:
        entry = nodes[message_id]["labels"].setdefault(label, {"count": 0, "notes": []})
        entry["count"] += 1
        if note:
            entry["notes"].append(note)
    roots: dict[str, list[dict[str, Any]]] = {}
    for node in nodes.values():
        parent = nodes.get(node["parent_id"]) if node["parent_id"] is not None else None
        if parent is not None:
            parent["replies"].append(node)
        else:
            roots.setdefault(node["_conversation"], []).append(node)
    for node in nodes.values():
        del node["_conversation"]
    return [
        {"message_tree_id": c.id, "title": c.title, "prompts": roots.get(c.id, [])} for c in convs
    ]
