"""Feedback ingestion: what users said, read from the database, and the trainer's watermark.

Two things are read separately:

* **What is new** (:func:`pending`) - feedback and rankings past the watermark stored in the
  ``trainer_state`` table. Feedback is keyed on ``(updated_at, id)``, because a changed vote
  updates its row in place (same id, new ``updated_at``) and must count as new once; rankings
  are keyed on ``id``. Rows younger than ``settle_seconds`` are left for the next poll, so a
  transaction that commits late with an earlier timestamp is not skipped. The watermark moves
  only in the transaction that records a round's outcome (:func:`save_watermark` takes the
  caller's session), so a trainer killed mid-round redoes the round and never counts an item
  twice.
* **What to learn from** (:func:`load_feedback`) - the current state of the newest
  ``max_items`` votes and rankings: a vote changed since the last round is used with its new
  value, once. The pairs and labels come from :func:`shared.feedback_reader.read_feedback`,
  the reader the admin export uses too (its docstring has the rules); and the **refusal
  pairs** (:func:`refusal_pairs`): for a request moderation flagged, the refusal is preferred
  to what the policy answered, so a policy served in ``flag`` mode learns to refuse.

Incomplete (cut-short) replies are never used. A ranking edited in place keeps its id, so the
edit does not count as new feedback (it is still used, with its new order, from then on).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from shared.db import session
from shared.feedback_reader import (
    ChatMessages,
    Moderated,
    Pair,
    Thumb,
    prompt_key,
    prompt_of,
    read_feedback,
    read_moderated,
    thread_nodes,
)
from shared.moderation import REFUSAL_REPLY, is_refusal
from shared.schema import (
    Conversation,
    Feedback,
    Label,
    Message,
    Ranking,
    TrainerState,
    User,
    utcnow,
)

WATERMARK_KEY = "feedback_watermark"


# --------------------------------------------------------------------------- watermark


@dataclass(frozen=True)
class Watermark:
    """Everything up to here has been consumed by a finished round."""

    feedback_at: datetime | None = None
    feedback_id: int = 0
    ranking_id: int = 0
    label_id: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "feedback_at": self.feedback_at.isoformat() if self.feedback_at else None,
            "feedback_id": self.feedback_id,
            "ranking_id": self.ranking_id,
            "label_id": self.label_id,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Watermark:
        if not data:
            return cls()
        at = data.get("feedback_at")
        return cls(
            datetime.fromisoformat(at) if at else None,
            int(data.get("feedback_id", 0)),
            int(data.get("ranking_id", 0)),
            int(data.get("label_id", 0)),  # watermarks from before labels lack it
        )


def load_watermark(engine: Engine) -> Watermark:
    with session(engine) as s:
        row = s.get(TrainerState, WATERMARK_KEY)
        return Watermark.from_json(row.value if row else None)


def save_watermark(s: Session, watermark: Watermark) -> None:
    """Store ``watermark`` in the caller's transaction (never on its own)."""
    row = s.get(TrainerState, WATERMARK_KEY)
    if row is None:
        row = TrainerState(key=WATERMARK_KEY)
    row.value = watermark.to_json()
    row.updated_at = utcnow()
    s.add(row)


def get_state(engine: Engine, key: str, default: Any = None) -> Any:
    with session(engine) as s:
        row = s.get(TrainerState, key)
        return default if row is None or row.value is None else row.value


def set_state(s: Session, key: str, value: Any) -> None:
    row = s.get(TrainerState, key) or TrainerState(key=key)
    row.value, row.updated_at = value, utcnow()
    s.add(row)


@dataclass(frozen=True)
class Pending:
    """Feedback past the watermark: counts, where the watermark moves once it is consumed."""

    n_feedback: int
    n_rankings: int
    watermark: Watermark  # the watermark after consuming these
    oldest_at: datetime | None  # when the oldest unconsumed item was given (feedback lag)
    n_labels: int = 0  # labels (harmful, untrue...) count as feedback items too

    @property
    def total(self) -> int:
        return self.n_feedback + self.n_rankings + self.n_labels


def _usable_votes():
    return (
        select(Feedback.id, Feedback.updated_at)
        .join(Message, col(Message.id) == Feedback.message_id)
        .where(Message.role == "assistant", ~col(Message.incomplete))
    )


def _past(s: Session, table: type[Ranking] | type[Label], last_id: int, cutoff: datetime):
    """(count, largest id, oldest created_at) of ``table``'s rows past ``last_id`` made by
    ``cutoff``."""
    return s.exec(
        select(func.count(col(table.id)), func.max(table.id), func.min(table.created_at))
        .where(col(table.id) > last_id)
        .where(table.created_at <= cutoff)
    ).one()


def pending(engine: Engine, watermark: Watermark, settle_seconds: float = 0.0) -> Pending:
    """New votes, rankings and labels past ``watermark`` that are at least ``settle_seconds``
    old."""
    cutoff = utcnow() - timedelta(seconds=settle_seconds)
    votes = _usable_votes().where(Feedback.updated_at <= cutoff)
    if watermark.feedback_at is not None:
        votes = votes.where(
            or_(
                col(Feedback.updated_at) > watermark.feedback_at,
                and_(
                    col(Feedback.updated_at) == watermark.feedback_at,
                    col(Feedback.id) > watermark.feedback_id,
                ),
            )
        )
    with session(engine) as s:
        rows = s.exec(votes.order_by(col(Feedback.updated_at), col(Feedback.id))).all()
        rank_n, rank_max, rank_min_at = _past(s, Ranking, watermark.ranking_id, cutoff)
        label_n, label_max, label_min_at = _past(s, Label, watermark.label_id, cutoff)
    at, fid = watermark.feedback_at, watermark.feedback_id
    if rows:
        fid, at = rows[-1][0], rows[-1][1]
    firsts = (rows[0][1] if rows else None, rank_min_at, label_min_at)
    oldest = [t for t in firsts if t is not None]
    return Pending(
        n_feedback=len(rows),
        n_rankings=int(rank_n or 0),
        watermark=Watermark(
            at,
            fid,
            max(watermark.ranking_id, int(rank_max or 0)),
            max(watermark.label_id, int(label_max or 0)),
        ),
        oldest_at=min(oldest) if oldest else None,
        n_labels=int(label_n or 0),
    )


# --------------------------------------------------------------------------- dataset


@dataclass
class FeedbackData:
    pairs: list[Pair] = field(default_factory=list)
    thumbs: list[Thumb] = field(default_factory=list)
    prompts: list[ChatMessages] = field(default_factory=list)  # logged prompts, newest first

    def __len__(self) -> int:
        return len(self.pairs) + len(self.thumbs)

    def split(self, heldout_percent: int) -> tuple[FeedbackData, FeedbackData]:
        """(train, heldout), split by prompt so no held-out prompt is trained on."""
        train, held = FeedbackData(prompts=self.prompts), FeedbackData(prompts=self.prompts)
        for p in self.pairs:
            (held if is_heldout(p.prompt, heldout_percent) else train).pairs.append(p)
        for t in self.thumbs:
            (held if is_heldout(t.prompt, heldout_percent) else train).thumbs.append(t)
        return train, held

    def to_json(self) -> dict[str, Any]:
        return {
            "pairs": [asdict(p) for p in self.pairs],
            "thumbs": [asdict(t) for t in self.thumbs],
            "prompts": self.prompts,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeedbackData:
        return cls(
            [Pair(**p) for p in data["pairs"]],
            [Thumb(**t) for t in data["thumbs"]],
            data["prompts"],
        )


def is_heldout(prompt: ChatMessages, percent: int) -> bool:
    digest = hashlib.sha256(prompt_key(prompt).encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < percent


def load_feedback(
    engine: Engine,
    *,
    max_items: int = 4000,
    margin: float = 0.0,
    max_pairs_per_prompt: int = 16,
    max_prompts: int = 2000,
    seed: int = 0,
    refusals_per_prompt: int = 0,
    ignore_users: Sequence[str] = (),
) -> FeedbackData:
    """Pairs and thumbs from the newest ``max_items`` votes and rankings (read by
    :func:`shared.feedback_reader.read_feedback`, as the export is), refusal pairs from the
    newest ``max_items`` moderated replies (at most ``refusals_per_prompt`` a prompt; 0:
    none), and the newest logged prompts; the conversations of ``ignore_users`` give no
    refusal pairs and no prompts."""
    logged = read_feedback(
        engine,
        max_items=max_items,
        margin=margin,
        max_pairs_per_prompt=max_pairs_per_prompt,
        seed=seed,
    )
    pairs = logged.pairs
    if refusals_per_prompt:
        moderated = read_moderated(engine, max_items=max_items, ignore_users=ignore_users)
        pairs = pairs + refusal_pairs(moderated, logged.thumbs, refusals_per_prompt, margin)
    prompts = logged_prompts(engine, max_prompts, ignore_users)
    return FeedbackData(pairs, logged.thumbs, prompts)


def refusal_pairs(
    moderated: list[Moderated], thumbs: list[Thumb], per_prompt: int, margin: float = 0.0
) -> list[Pair]:
    """Pairs that teach when to refuse, as many of each kind:

    * (refusal > reply) for the replies to a flagged request that do not refuse, at most
      ``per_prompt`` distinct ones a prompt, newest first; none for a prompt where a user
      liked an answer that does not refuse (the classifier may be wrong) or labelled a reply
      ``refusal_was_wrong``;
    * (liked answer > refusal) for requests moderation checked and did not flag, one a prompt,
      newest first, on answers that do not refuse: without them the refusal leaks into
      answers to everything else.
    """
    liked = {t.message_id for t in thumbs if t.label > 0}
    flagged = [m for m in moderated if m.flagged]
    spared = {
        prompt_key(m.prompt)
        for m in flagged
        if (m.message_id in liked and not is_refusal(m.reply)) or "refusal_was_wrong" in m.labels
    }
    refuse: list[Pair] = []
    seen: dict[str, set[str]] = {}
    for m in flagged:
        key, reply = prompt_key(m.prompt), m.reply.strip()
        if not reply or is_refusal(reply) or key in spared:
            continue
        replies = seen.setdefault(key, set())
        if reply in replies or len(replies) >= per_prompt:
            continue
        replies.add(reply)
        refuse.append(Pair(m.prompt, REFUSAL_REPLY, m.reply, margin, "refusal"))
    answer: list[Pair] = []
    flagged_keys = {prompt_key(m.prompt) for m in flagged}
    for m in moderated:
        if len(answer) >= len(refuse):
            break
        key = prompt_key(m.prompt)
        if m.flagged or m.message_id not in liked or is_refusal(m.reply):
            continue
        if key in flagged_keys or key in seen:
            continue
        seen[key] = set()
        answer.append(Pair(m.prompt, m.reply, REFUSAL_REPLY, margin, "refusal"))
    return refuse + answer


def logged_prompts(
    engine: Engine, max_prompts: int, ignore_users: Sequence[str] = ()
) -> list[ChatMessages]:
    """Distinct prompts (ending in a user turn) of the newest replies, newest first, except
    in the conversations of ``ignore_users``."""
    query = (
        select(col(Message.id))
        .where(Message.role == "assistant", col(Message.parent_id).is_not(None))
        .order_by(col(Message.id).desc())
        .limit(max_prompts * 4)
    )
    if ignore_users:
        query = (
            query.join(Conversation, col(Conversation.id) == Message.conversation_id)
            .join(User, col(User.id) == Conversation.user_id)
            .where(col(User.name).not_in(list(ignore_users)))
        )
    with session(engine) as s:
        recent: list[int] = s.exec(query).all()  # type: ignore[assignment]  # ids of stored rows are never None
        nodes = thread_nodes(s, recent)
    prompts: list[ChatMessages] = []
    seen: set[str] = set()
    for message_id in recent:
        prompt = prompt_of(nodes, message_id) if message_id in nodes else []
        key = prompt_key(prompt)
        if prompt and prompt[-1]["role"] == "user" and key not in seen:
            seen.add(key)
            prompts.append(prompt)
            if len(prompts) >= max_prompts:
                break
    return prompts
