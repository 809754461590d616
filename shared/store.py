"""The conversation log, shared by the API server and the trainer (votes on its answers
are in :mod:`shared.votes`, labels in :mod:`shared.labels`).

Plain synchronous functions over a SQLAlchemy ``Engine``; each call is one short
transaction (the API runs them in a worker thread). Data of other users is reported as
:class:`NotFound`, like data that does not exist, so ids cannot be probed.

Decisions worth knowing:

* What is logged with a completion is exactly the prompt the model was given: the path from
  a root message to a reply, read back by the conversation view, the exports and the trainer,
  is the message list the reply was generated from. :func:`log_completion` takes that whole
  list and files it along the stored path that matches it from the root, message by message
  (same role and text; newest first among equal siblings), and stores the rest, where the
  list leaves the log, as a new branch. So a regeneration (the same prompt sent again) becomes
  a sibling of the earlier answer, and an edited history a branch of its own.
* A continuation that sends only new messages (no assistant message among them) is generated
  from :func:`continuation_prompt`: the conversation's current path, to the best choice of
  this user's ranking of the newest completion, else to the newest answer, followed by them.
* Soft-deleted conversations keep their rows for training; the feedback logged here becomes
  pairs and labels (for the trainer and the TRL export alike) in :mod:`shared.feedback_reader`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from shared.db import session
from shared.messages import MessageError, normalise_message
from shared.schema import Conversation, Feedback, Message, Ranking, conversation_uuid, utcnow

TITLE_MAX = 60
REASON_MAX = 2000
LIST_MAX = 500


class NotFound(Exception):
    """No such object for this user (also for other users' objects)."""


class Invalid(ValueError):
    """The request is malformed (bad rating, bad ranking, bad messages)."""


@dataclass
class LoggedChoice:
    """One generated candidate of a completion request."""

    index: int
    text: str
    finish_reason: str | None
    completion_tokens: int | None
    logprobs: Any | None = None
    moderation: dict[str, Any] | None = None  # the request's and this reply's decisions


# --------------------------------------------------------------------------- logging


def storable(engine: Engine, text: str) -> str:
    """``text`` as the log stores it: PostgreSQL text columns cannot hold NUL (the byte-level
    tokenizer can generate one, and clients can send one), so there NUL becomes U+FFFD."""
    return text.replace("\x00", "\ufffd") if engine.dialect.name == "postgresql" else text


def _normalised(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    try:
        return [normalise_message(m) for m in messages]
    except MessageError as e:
        raise Invalid(str(e)) from None


def _title(messages: list[dict[str, str]]) -> str:
    for m in messages:
        if m.get("role") == "user":
            text = " ".join(m["content"].split())
            return text if len(text) <= TITLE_MAX else text[: TITLE_MAX - 1] + "…"
    return ""


def _own_conversation(s: Session, user_id: int, conversation_id: str) -> Conversation:
    # an id with NUL cannot exist, and PostgreSQL refuses NUL in a text parameter
    conv = None if "\x00" in conversation_id else s.get(Conversation, conversation_id)
    if conv is None or conv.user_id != user_id or conv.deleted_at is not None:
        raise NotFound(f"conversation {conversation_id} not found")
    return conv


def _current_leaf(s: Session, conv: Conversation, user_id: int) -> Message | None:
    """Where a continuation with only new messages goes on from: the best choice of this
    user's ranking of the newest completion, else the newest answer, else the newest message."""
    newest = s.exec(
        select(Message)
        .where(Message.conversation_id == conv.id, Message.role == "assistant")
        .order_by(col(Message.id).desc())
    ).first()
    if newest is not None:
        ranking = s.exec(
            select(Ranking).where(
                Ranking.completion_id == newest.completion_id, Ranking.user_id == user_id
            )
        ).first()
        if ranking is not None and ranking.ranking:
            best = s.get(Message, ranking.ranking[0])
            if best is not None and best.conversation_id == conv.id:
                return best
        return newest
    return s.exec(
        select(Message).where(Message.conversation_id == conv.id).order_by(col(Message.id).desc())
    ).first()


def _path_to(s: Session, leaf: Message | None) -> list[Message]:
    path: list[Message] = []
    while leaf is not None:
        path.append(leaf)
        leaf = s.get(Message, leaf.parent_id) if leaf.parent_id is not None else None
    return path[::-1]


def is_full_history(messages: list[dict[str, Any]]) -> bool:
    """A request's messages are a whole history (generated from as sent) when one of them is
    an assistant message; otherwise they are new turns after the conversation's path."""
    return any(m.get("role") == "assistant" for m in messages)


def continuation_prompt(
    engine: Engine, user_id: int, conversation_id: str, messages: list[dict[str, Any]]
) -> list[dict[str, str]]:
    """The messages a continuation of ``conversation_id`` is generated from: ``messages``
    themselves when they are a full history (:func:`is_full_history`), else the
    conversation's current path followed by them. :class:`NotFound` unless it is this
    user's own live conversation."""
    messages = _normalised(messages)
    with session(engine) as s:
        conv = _own_conversation(s, user_id, conversation_id)
        if is_full_history(messages):
            return messages
        path = _path_to(s, _current_leaf(s, conv, user_id))
        return [{"role": m.role, "content": m.content} for m in path] + messages


def _file_along_path(
    s: Session, conv: Conversation, messages: list[dict[str, str]]
) -> tuple[int | None, list[dict[str, str]]]:
    """(the id of the deepest stored message on the path that matches ``messages`` from the
    root, the messages after it, to be stored under it as a new branch)."""
    rows = s.exec(
        select(Message.id, Message.parent_id, Message.role, Message.content)
        .where(Message.conversation_id == conv.id)
        .order_by(col(Message.id).desc())
    ).all()
    children: dict[int | None, list[tuple[int, str, str]]] = {}
    for mid, parent, role, content in rows:  # newest first
        assert mid is not None  # stored rows have ids
        children.setdefault(parent, []).append((mid, role, content))
    parent_id: int | None = None
    for depth, m in enumerate(messages):
        match = next(
            (
                mid
                for mid, role, content in children.get(parent_id, ())
                if role == m["role"] and content == m["content"]
            ),
            None,
        )
        if match is None:
            return parent_id, messages[depth:]
        parent_id = match
    return parent_id, []


def log_completion(
    engine: Engine,
    *,
    user_id: int,
    completion_id: str,
    messages: list[dict[str, Any]],
    choices: list[LoggedChoice],
    prompt_tokens: int | None,
    policy_version: str | None,
    sampling_params: dict[str, Any],
    latency_ms: float | None,
    incomplete: bool = False,
    conversation_id: str | None = None,
    new_conversation_id: str | None = None,
    end_user: str | None = None,
) -> str:
    """Store a completion request and its choices; return the conversation id.

    ``messages`` is the whole prompt the choices were generated from; with
    ``conversation_id`` it is filed along the conversation's matching path (see the module
    docstring). Idempotent on ``completion_id``: a repeated call returns the existing conversation.
    ``new_conversation_id`` names the conversation a call without ``conversation_id``
    creates (default: a fresh UUID), so a caller that queues the write can tell the client
    the id before it is stored.
    """
    prepared = _checked_completion(
        engine,
        user_id=user_id,
        completion_id=completion_id,
        messages=messages,
        choices=choices,
        prompt_tokens=prompt_tokens,
        policy_version=policy_version,
        sampling_params=sampling_params,
        latency_ms=latency_ms,
        incomplete=incomplete,
        conversation_id=conversation_id,
        new_conversation_id=new_conversation_id,
        end_user=end_user,
    )
    try:
        with session(engine) as s:
            return _file_completion(s, prepared)
    except IntegrityError:
        # A concurrent retry of the same completion won the race.
        with session(engine) as s:
            existing = s.exec(
                select(Message.conversation_id).where(Message.completion_id == completion_id)
            ).first()
            if existing is None:
                raise
            return _existing_conversation(s, existing, completion_id, user_id)


def log_completions(engine: Engine, calls: Sequence[Mapping[str, Any]]) -> list[str]:
    """:func:`log_completion` for each of ``calls`` (its keyword arguments), in one
    transaction: all are stored or, on the first error, none (the caller may then write them
    one at a time, so that only the bad one fails)."""
    prepared = [_checked_completion(engine, **call) for call in calls]
    with session(engine) as s:
        return [_file_completion(s, p) for p in prepared]


def _checked_completion(
    engine: Engine,
    *,
    messages: list[dict[str, Any]],
    choices: list[LoggedChoice],
    end_user: str | None = None,
    **rest: Any,
) -> dict[str, Any]:
    """``log_completion``'s arguments checked (:class:`Invalid`) and made storable."""
    if not choices:
        raise Invalid("a completion needs at least one choice")
    if len({c.index for c in choices}) != len(choices):
        raise Invalid("choice indices must be distinct")
    if not messages:
        raise Invalid("a completion needs at least one prompt message")
    messages = _normalised(messages)
    if engine.dialect.name == "postgresql":  # see storable()
        messages = [{**m, "content": storable(engine, m["content"])} for m in messages]
        choices = [replace(c, text=storable(engine, c.text)) for c in choices]
        end_user = storable(engine, end_user) if end_user is not None else None
    return {"messages": messages, "choices": choices, "end_user": end_user, **rest}


_MESSAGES = Message.__table__  # type: ignore[attr-defined]  # SQLModel sets it
_CONVERSATION_OF = (
    select(_MESSAGES.c.conversation_id)
    .where(_MESSAGES.c.completion_id == bindparam("completion_id"))
    .limit(1)
)
_INSERT_CONVERSATION = insert(Conversation.__table__)  # type: ignore[attr-defined]
_INSERT_MESSAGE = insert(_MESSAGES)
_INSERT_MESSAGE_ID = insert(_MESSAGES).returning(_MESSAGES.c.id)
# what every candidate of a request is stored with, as the caller gave it
_PER_REQUEST = ("policy_version", "sampling_params", "prompt_tokens", "latency_ms")


def _file_completion(s: Session, call: Mapping[str, Any]) -> str:
    """Add a completion (``log_completion``'s arguments, checked) to ``s``; its
    conversation's id. Rows go in as Core inserts: the ORM's unit of work cost several times
    the statements themselves, and every chat request pays it (docs/decisions.md, "Database
    calls are grouped")."""
    user_id, completion_id, messages = call["user_id"], call["completion_id"], call["messages"]
    conversation_id = call.get("conversation_id")
    conn = s.connection()
    existing = conn.execute(_CONVERSATION_OF, {"completion_id": completion_id}).scalar()
    if existing is not None:
        return _existing_conversation(s, existing, completion_id, user_id)
    now = utcnow()
    if conversation_id is None:
        conv_id = call.get("new_conversation_id") or conversation_uuid()
        conn.execute(
            _INSERT_CONVERSATION,
            {
                "id": conv_id,
                "user_id": user_id,
                "title": _title(messages),
                "created_at": now,
                "updated_at": now,
            },
        )
        parent_id, new = None, messages
    else:
        conv = _own_conversation(s, user_id, conversation_id)
        parent_id, new = _file_along_path(s, conv, messages)
        conv.updated_at = now
        s.add(conv)
        s.flush()
        conv_id = conv.id
    for m in new:
        row = {"conversation_id": conv_id, "parent_id": parent_id, "created_at": now}
        parent_id = conn.execute(_INSERT_MESSAGE_ID, row | m).scalar_one()
    assistant = {
        "conversation_id": conv_id,
        "parent_id": parent_id,
        "role": "assistant",
        "completion_id": completion_id,
        "incomplete": call.get("incomplete", False),
        "end_user": call.get("end_user"),
        "created_at": now,
        **{k: call[k] for k in _PER_REQUEST},
    }
    conn.execute(
        _INSERT_MESSAGE,
        [
            assistant
            | {
                "content": c.text,
                "completion_tokens": c.completion_tokens,
                "choice_index": c.index,
                "finish_reason": c.finish_reason,
                "logprobs": c.logprobs,
                "moderation": c.moderation,
            }
            for c in sorted(call["choices"], key=lambda c: c.index)
        ],
    )
    return conv_id


def _existing_conversation(
    s: Session, conversation_id: str, completion_id: str, user_id: int
) -> str:
    conv = s.get(Conversation, conversation_id)
    if conv is None or conv.user_id != user_id:
        raise Invalid(f"completion id {completion_id} is already used")
    return conv.id


# --------------------------------------------------------------------------- reading


def list_conversations(
    engine: Engine, user_id: int, limit: int = 50, before: datetime | None = None
) -> list[dict[str, Any]]:
    """The user's live conversations, most recently updated first.

    Page with ``before`` = the ``updated_at`` of the last conversation of the previous page.
    """
    if limit < 1:
        raise Invalid("limit must be positive")
    query = select(Conversation).where(
        Conversation.user_id == user_id, col(Conversation.deleted_at).is_(None)
    )
    if before is not None:
        query = query.where(Conversation.updated_at < before)
    query = query.order_by(col(Conversation.updated_at).desc(), col(Conversation.id).desc())
    with session(engine) as s:
        rows = s.exec(query.limit(min(limit, LIST_MAX))).all()
        return [
            {"id": c.id, "title": c.title, "created_at": c.created_at, "updated_at": c.updated_at}
            for c in rows
        ]


def get_conversation(engine: Engine, user_id: int, conversation_id: str) -> dict[str, Any]:
    """A conversation with all its messages in creation order and the user's ratings."""
    with session(engine) as s:
        conv = _own_conversation(s, user_id, conversation_id)
        rows = s.exec(
            select(Message, Feedback.rating)
            .join(
                Feedback,
                (col(Feedback.message_id) == col(Message.id)) & (col(Feedback.user_id) == user_id),
                isouter=True,
            )
            .where(Message.conversation_id == conv.id)
            .order_by(col(Message.id))
        ).all()
        fields: tuple[str, ...] = ("id", "parent_id", "role", "content", "policy_version")
        fields += ("completion_id", "choice_index", "finish_reason", "incomplete", "created_at")
        fields += ("moderation",)
        return {
            "id": conv.id,
            "title": conv.title,
            "created_at": conv.created_at,
            "updated_at": conv.updated_at,
            "messages": [{**{f: getattr(m, f) for f in fields}, "rating": r} for m, r in rows],
        }


def delete_conversation(engine: Engine, user_id: int, conversation_id: str) -> None:
    """Soft-delete a conversation (rows stay for training)."""
    with session(engine) as s:
        conv = _own_conversation(s, user_id, conversation_id)
        conv.deleted_at = utcnow()
        s.add(conv)
