"""Database tables of palmchat: users, conversations, feedback, policies and training runs.

Every timestamp is a timezone-aware UTC ``datetime``. SQLite has no time-zone type, so
:class:`UTCDateTime` stores naive UTC there and re-attaches UTC on the way out; PostgreSQL
uses ``timestamptz``. JSON columns use the generic ``JSON`` type so the same models work
on both back ends.

A change to these models needs a new Alembic migration in ``shared/migrations/versions``;
``tests/shared/test_db.py`` fails when the migrated schema and these models disagree.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, CheckConstraint, Column, DateTime, Text, UniqueConstraint
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

# Deterministic constraint names, so later migrations (and SQLite batch mode, which
# recreates tables) can refer to constraints by name on every back end.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ROLES: tuple[str, ...] = ("system", "user", "assistant")
POLICY_STATUSES: tuple[str, ...] = ("candidate", "active", "retired", "rejected", "canary")
RUN_STATUSES: tuple[str, ...] = ("running", "published", "rejected", "failed")
# what a user may say about an answer beyond a thumb (Open-Assistant's labels, and a refusal
# that should not have been one)
LABELS: tuple[str, ...] = (
    "harmful", "untrue", "unhelpful", "spam", "pii", "hate_speech", "sexual_content",
    "violence", "refusal_was_wrong",
)  # fmt: skip


def utcnow() -> datetime:
    """The current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


def _in_list(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UTCDateTime(TypeDecorator[datetime]):
    """A ``DateTime`` that always hands back aware UTC datetimes.

    Naive datetimes given to it are taken to be UTC already.
    """

    impl = DateTime
    cache_ok = True

    def __init__(self) -> None:
        super().__init__(timezone=True)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        # SQLite would silently drop the offset anyway; make it explicit.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _json(nullable: bool) -> Column[Any]:
    # none_as_null: a Python None is stored as SQL NULL, not the JSON literal 'null',
    # so "IS NULL" queries mean what they say.
    return Column(JSON(none_as_null=True), nullable=nullable)


class User(SQLModel, table=True):
    __tablename__ = "users"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class ApiKey(SQLModel, table=True):
    """An API key. Only its SHA-256 is stored, so a database leak does not leak keys."""

    __tablename__ = "api_keys"

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id", ondelete="CASCADE", index=True)
    key_hash: str = Field(unique=True, description="sha256 hex digest of the key")
    prefix: str = Field(description="First 8 characters of the key, for display only.")
    is_admin: bool = False
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)

    @staticmethod
    def hash_key(key: str) -> str:
        """The value stored in ``key_hash`` for ``key``."""
        return hashlib.sha256(key.encode("utf-8")).hexdigest()


def conversation_uuid() -> str:
    return str(uuid.uuid4())


class Conversation(SQLModel, table=True):
    """A chat thread. Deleting one sets ``deleted_at``; rows stay for training."""

    __tablename__ = "conversations"

    id: str = Field(default_factory=conversation_uuid, primary_key=True)
    user_id: int = Field(foreign_key="users.id", ondelete="CASCADE", index=True)
    title: str = ""
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(
        default_factory=utcnow, sa_type=UTCDateTime, sa_column_kwargs={"onupdate": utcnow}
    )
    deleted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class Message(SQLModel, table=True):
    """One turn of a conversation, stored as a tree.

    ``parent_id`` points at the message this one answers or follows; regenerations and
    the ``n`` candidates of one completion request are siblings under the same parent.
    Assistant messages carry the generation metadata (policy, sampling, token counts,
    logprobs) that the trainer needs. ``incomplete`` marks a generation cut short (client
    disconnect, server shutdown), which must not be trained on as a finished answer.
    """

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("completion_id", "choice_index"),
        CheckConstraint(_in_list("role", ROLES), name="role"),
    )

    id: int | None = Field(default=None, primary_key=True)
    conversation_id: str = Field(foreign_key="conversations.id", ondelete="CASCADE", index=True)
    parent_id: int | None = Field(
        default=None, foreign_key="messages.id", ondelete="CASCADE", index=True
    )
    role: str
    content: str = Field(sa_type=Text)
    policy_version: str | None = None
    sampling_params: dict[str, Any] | None = Field(default=None, sa_column=_json(nullable=True))
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    completion_id: str | None = Field(
        default=None, index=True, description='The API\'s "chatcmpl-..." handle.'
    )
    choice_index: int | None = None
    finish_reason: str | None = None
    logprobs: Any | None = Field(default=None, sa_column=_json(nullable=True))
    latency_ms: float | None = None
    incomplete: bool = False
    moderation: dict[str, Any] | None = Field(
        default=None,
        sa_column=_json(nullable=True),
        description="The moderation decisions on the request and this reply.",
    )
    end_user: str | None = Field(
        default=None, index=True, description="The request's ``user`` field (OpenAI's end-user id)."
    )
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class _UserVote(SQLModel):
    """The columns a user's vote on a message carries: who, and when it was cast and changed."""

    user_id: int = Field(foreign_key="users.id", ondelete="CASCADE", index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(
        default_factory=utcnow, sa_type=UTCDateTime, sa_column_kwargs={"onupdate": utcnow}
    )


class Feedback(_UserVote, table=True):
    """A thumbs up (+1) or down (-1) by a user on a message.

    One row per (message, user): a second vote must update the existing row. A trainer
    that reads feedback incrementally should therefore key on ``updated_at`` (or accept
    that changed votes keep their old ``id``).
    """

    __tablename__ = "feedback"
    __table_args__ = (
        UniqueConstraint("message_id", "user_id"),
        CheckConstraint("rating IN (-1, 1)", name="rating"),
    )

    id: int | None = Field(default=None, primary_key=True)
    message_id: int = Field(foreign_key="messages.id", ondelete="CASCADE")
    rating: int
    reason: str | None = Field(default=None, sa_type=Text)


class Label(_UserVote, table=True):
    """A label a user puts on a message (one vote per label), with an optional note."""

    __tablename__ = "labels"
    __table_args__ = (
        UniqueConstraint("message_id", "user_id", "label"),
        CheckConstraint(_in_list("label", LABELS), name="label"),
    )

    id: int | None = Field(default=None, primary_key=True)
    message_id: int = Field(foreign_key="messages.id", ondelete="CASCADE", index=True)
    label: str
    note: str | None = Field(default=None, sa_type=Text)


class Ranking(SQLModel, table=True):
    """A user's ordering of the candidates of one completion request.

    ``ranking`` lists ``Message.id`` values best first. It is keyed by ``completion_id``
    rather than a foreign key because it spans several messages.
    """

    __tablename__ = "rankings"
    __table_args__ = (UniqueConstraint("completion_id", "user_id"),)

    id: int | None = Field(default=None, primary_key=True)
    completion_id: str = Field(index=True)
    user_id: int = Field(foreign_key="users.id", ondelete="CASCADE", index=True)
    ranking: list[int] = Field(default_factory=list, sa_column=_json(nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Policy(SQLModel, table=True):
    """A policy version known to the service and its lifecycle state.

    ``parent_version`` is deliberately not a foreign key: a base checkpoint may live in
    the registry without ever having been recorded here.
    """

    __tablename__ = "policies"
    __table_args__ = (CheckConstraint(_in_list("status", POLICY_STATUSES), name="status"),)

    version: str = Field(primary_key=True)
    status: str = "candidate"
    parent_version: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=_json(nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    activated_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    retired_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # a canary: the share of users it serves beside the active version, and since when
    canary_share: float | None = None
    canary_started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # how its rollout ended: the decision, who or what made it, and the evidence
    decision: dict[str, Any] | None = Field(default=None, sa_column=_json(nullable=True))


class TrainingRun(SQLModel, table=True):
    """One trainer round: which feedback it consumed and what it produced."""

    __tablename__ = "training_runs"
    __table_args__ = (CheckConstraint(_in_list("status", RUN_STATUSES), name="status"),)

    id: int | None = Field(default=None, primary_key=True)
    started_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    status: str = "running"
    algo: str
    base_version: str
    candidate_version: str | None = None
    feedback_watermark: int = 0
    n_feedback: int = 0
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=_json(nullable=False))


class TrainerState(SQLModel, table=True):
    """Small key/value store for the trainer, e.g. its feedback watermark."""

    __tablename__ = "trainer_state"

    key: str = Field(primary_key=True)
    value: Any | None = Field(default=None, sa_column=_json(nullable=True))
    updated_at: datetime = Field(
        default_factory=utcnow, sa_type=UTCDateTime, sa_column_kwargs={"onupdate": utcnow}
    )
