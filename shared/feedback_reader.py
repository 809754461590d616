"""Logged feedback as training data: preference pairs and pointwise labels, and TRL's formats.

One reader, :func:`read_feedback`, turns the thumbs and rankings in the database into
:class:`Pair` and :class:`Thumb` objects. The trainer learns from what it returns (with its
budget: the newest ``max_items`` items, at most ``max_pairs_per_prompt`` thumbs pairs a
prompt) and the admin export writes the same data, unbudgeted, as TRL rows, so an export is
the data the trainer learns from.

The rules:

* A ranking gives every ordered pair of the replies it lists (best before worse), with a
  margin of ``margin`` per rank of distance; two replies with the same text make no pair.
* Each vote gives a pointwise label (+1 up, -1 down) with its current value: a changed vote
  counts once, as it is now.
* An up and a down on replies to the same prompt (the same messages from the root, so a
  regeneration, another choice of the same request or the same question asked in another
  conversation) give a pair; distinct texts only, each (up, down) text pair once a prompt.
* A label on a reply (harmful, untrue, ..., a refusal that was wrong) is a thumbs down that
  weighs more (:data:`LABEL_WEIGHTS`); it wins over a thumbs up on the same reply.
* :func:`read_moderated` lists the replies moderation checked, flagged or not, for the
  trainer's refusal pairs (they are the trainer's own, so no export holds them).
* Incomplete (cut-short) replies are never used. Soft-deleted conversations are (their rows
  stay for training).

The exports are generators that read when first consumed, so the API can run them in a worker
thread.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from shared.db import session
from shared.messages import ChatMessages
from shared.schema import LABELS, Conversation, Feedback, Label, Message, Ranking, User

_IN_LIST = 500  # ids per IN (...) query
# how much a label weighs in the reward model's pointwise term, a thumb weighing 1: a harmful
# or untrue answer is worse than one a user merely disliked (docs/decisions.md,
# "Safety in the loop: labels, refusal pairs, and the gate")
LABEL_WEIGHTS: dict[str, float] = {
    **{label: 1.5 for label in LABELS},
    "harmful": 3.0,
    "untrue": 2.0,
    "refusal_was_wrong": 2.0,
}


@dataclass(frozen=True)
class Pair:
    """``chosen`` is preferred to ``rejected`` as the reply to ``prompt``."""

    prompt: ChatMessages
    chosen: str
    rejected: str
    margin: float = 0.0
    # ranking | thumbs (logged) | reward_model (on-policy) | refusal (flagged; trainer-made)
    source: str = "ranking"
    # True: thumbs agree (chosen up, rejected down); False: both got the same thumb, so the
    # order may be a tie broken arbitrarily; None: no thumbs on them
    decisive: bool | None = None


@dataclass(frozen=True)
class Thumb:
    prompt: ChatMessages
    reply: str
    label: int  # +1 up, -1 down
    message_id: int = 0
    weight: float = 1.0  # a labelled reply's weighs more (LABEL_WEIGHTS)
    labels: tuple[str, ...] = ()  # users' labels on the reply


@dataclass(frozen=True)
class Moderated:
    """A reply whose request moderation checked (in any mode): flagged or not, in which
    categories, and users' labels on it."""

    prompt: ChatMessages
    reply: str
    flagged: bool
    categories: tuple[str, ...] = ()
    message_id: int = 0
    labels: tuple[str, ...] = ()


@dataclass
class LoggedFeedback:
    """What :func:`read_feedback` returns: ranking pairs (newest ranking first), then thumbs
    pairs; pointwise labels, newest vote first, then labelled replies nobody voted on."""

    pairs: list[Pair] = field(default_factory=list)
    thumbs: list[Thumb] = field(default_factory=list)


def prompt_key(prompt: ChatMessages) -> str:
    return json.dumps([[m["role"], m["content"]] for m in prompt])


# --------------------------------------------------------------------------- threads

Node = tuple[int | None, str, str, bool]  # parent_id, role, content, incomplete


def thread_nodes(s: Session, message_ids: Iterable[int]) -> dict[int, Node]:
    """Every message of the conversations that hold ``message_ids``, by id."""
    ids = list(set(message_ids))
    out: dict[int, Node] = {}
    for start in range(0, len(ids), _IN_LIST):
        convs = select(Message.conversation_id).where(
            col(Message.id).in_(ids[start : start + _IN_LIST])
        )
        rows = s.exec(
            select(  # type: ignore[call-overload]  # sqlmodel types select() up to 4 columns
                Message.id, Message.parent_id, Message.role, Message.content, Message.incomplete
            ).where(col(Message.conversation_id).in_(convs))
        ).all()
        out.update({r[0]: (r[1], r[2], r[3], bool(r[4])) for r in rows})
    return out


def prompt_of(nodes: dict[int, Node], message_id: int) -> ChatMessages:
    """Messages from the root down to the parent of ``message_id``."""
    path: ChatMessages = []
    parent = nodes[message_id][0]
    while parent is not None and parent in nodes and len(path) <= len(nodes):
        p_parent, role, content, _ = nodes[parent]
        path.append({"role": role, "content": content})
        parent = p_parent
    return path[::-1]


# --------------------------------------------------------------------------- the reader


def read_feedback(
    engine: Engine,
    *,
    max_items: int | None = None,
    since_id: int = 0,
    margin: float = 0.0,
    max_pairs_per_prompt: int | None = None,
    seed: int = 0,
) -> LoggedFeedback:
    """Pairs and labels from the votes and rankings (see the module docstring for the rules).

    ``max_items``: only the newest that many votes and the newest that many rankings (None:
    all). ``since_id``: only votes and rankings with a larger id (separate id sequences), so a
    thumbs pair needs both votes past it. ``max_pairs_per_prompt``: a seeded sample of at most
    that many thumbs pairs a prompt (None: all).
    """
    votes_q = (
        select(Feedback.message_id, Feedback.rating)
        .join(Message, col(Message.id) == Feedback.message_id)
        .where(Message.role == "assistant", ~col(Message.incomplete), col(Feedback.id) > since_id)
        .order_by(col(Feedback.updated_at).desc(), col(Feedback.id).desc())
    )
    rankings_q = (
        select(Ranking.ranking).where(col(Ranking.id) > since_id).order_by(col(Ranking.id).desc())
    )
    # replies labelled but not voted on: the newest ``max_items`` labels past ``since_id``
    labels_q = (
        select(Label.message_id)
        .join(Message, col(Message.id) == Label.message_id)
        .where(Message.role == "assistant", ~col(Message.incomplete), col(Label.id) > since_id)
        .order_by(col(Label.id).desc())
    )
    if max_items is not None:
        votes_q, rankings_q = votes_q.limit(max_items), rankings_q.limit(max_items)
        labels_q = labels_q.limit(max_items)
    with session(engine) as s:
        votes = list(s.exec(votes_q).all())
        rankings = s.exec(rankings_q).all()
        voted = {m for m, _ in votes}
        unvoted = [m for m in dict.fromkeys(s.exec(labels_q).all()) if m not in voted]
        nodes = thread_nodes(s, voted | set(unvoted) | {m for r in rankings for m in r})
    # every label on a voted reply counts, however old; a labelled reply nobody voted on is a
    # down vote after the votes
    labelled = labels_by_message(engine, [*voted, *unvoted])
    votes += [(m, -1) for m in unvoted]
    data = LoggedFeedback()
    ratings: dict[int, set[int]] = {}
    for message_id, rating in votes:
        ratings.setdefault(message_id, set()).add(1 if rating > 0 else -1)
    for ranked in rankings:
        data.pairs += _ranking_pairs(nodes, ranked, ratings, margin)
    groups: dict[str, tuple[ChatMessages, list[str], list[str]]] = {}
    for message_id, rating in votes:
        if message_id not in nodes:
            continue
        prompt, reply = prompt_of(nodes, message_id), nodes[message_id][2]
        labels = tuple(sorted(labelled.get(message_id, ())))
        up = rating > 0 and not labels
        weight = max((LABEL_WEIGHTS[lab] for lab in labels), default=1.0)
        data.thumbs.append(Thumb(prompt, reply, 1 if up else -1, message_id, weight, labels))
        _, ups, downs = groups.setdefault(prompt_key(prompt), (prompt, [], []))
        (ups if up else downs).append(reply)
    rng = random.Random(seed)
    for prompt, ups, downs in groups.values():
        candidates = [(u, d) for u in dict.fromkeys(ups) for d in dict.fromkeys(downs) if u != d]
        if max_pairs_per_prompt is not None and len(candidates) > max_pairs_per_prompt:
            candidates = rng.sample(candidates, max_pairs_per_prompt)
        data.pairs += [Pair(prompt, u, d, margin, "thumbs", True) for u, d in candidates]
    return data


def read_moderated(
    engine: Engine, *, max_items: int | None = None, ignore_users: Sequence[str] = ()
) -> list[Moderated]:
    """The newest ``max_items`` complete replies whose request moderation checked (None: all),
    newest first, leaving out the conversations of the users named in ``ignore_users``
    (monitoring probes, evaluations: traffic to learn nothing from)."""
    query = (
        select(Message.id, Message.moderation)
        .join(Conversation, col(Conversation.id) == Message.conversation_id)
        .join(User, col(User.id) == Conversation.user_id)
        .where(
            Message.role == "assistant",
            ~col(Message.incomplete),
            col(Message.moderation).is_not(None),
        )
        .order_by(col(Message.id).desc())
    )
    if ignore_users:
        query = query.where(col(User.name).not_in(list(ignore_users)))
    if max_items is not None:
        query = query.limit(max_items)
    with session(engine) as s:
        checked: dict[int, tuple[bool, tuple[str, ...]]] = {}
        for message_id, decisions in s.exec(query).all():
            found = (decisions or {}).get("input") or {}
            if found and message_id is not None:
                cats = tuple(found.get("categories") or ())
                checked[message_id] = (bool(found.get("flagged")), cats)
        nodes = thread_nodes(s, checked)
    labels = labels_by_message(engine, list(checked))
    return [
        Moderated(prompt_of(nodes, m), nodes[m][2], flagged, cats, m, tuple(labels.get(m, ())))
        for m, (flagged, cats) in checked.items()
        if m in nodes
    ]


def _ranking_pairs(
    nodes: dict[int, Node], ranked: Sequence[int], ratings: dict[int, set[int]], margin: float
) -> list[Pair]:
    ranked = [m for m in ranked if m in nodes and not nodes[m][3]]
    if len(ranked) < 2:
        return []
    prompt = prompt_of(nodes, ranked[0])
    pairs = []
    for i, better in enumerate(ranked):
        for j in range(i + 1, len(ranked)):
            worse = ranked[j]
            if nodes[better][2] == nodes[worse][2]:
                continue
            decisive = None
            if better in ratings and worse in ratings:
                decisive = 1 in ratings[better] and -1 in ratings[worse]
            chosen, rejected = nodes[better][2], nodes[worse][2]
            pairs.append(Pair(prompt, chosen, rejected, margin * (j - i), "ranking", decisive))
    return pairs


# --------------------------------------------------------------------------- TRL exports


def _reply(text: str) -> ChatMessages:
    return [{"role": "assistant", "content": text}]


def export_preference(engine: Engine, since_id: int = 0) -> Iterator[dict[str, Any]]:
    """TRL preference rows ``{"prompt", "chosen", "rejected"}`` (conversational form), one per
    pair of :func:`read_feedback`, in its order."""
    for p in read_feedback(engine, since_id=since_id).pairs:
        yield {"prompt": p.prompt, "chosen": _reply(p.chosen), "rejected": _reply(p.rejected)}


def export_kto(engine: Engine, since_id: int = 0) -> Iterator[dict[str, Any]]:
    """TRL unpaired preference rows ``{"prompt", "completion", "label"}``, one per pointwise
    label of :func:`read_feedback` (a vote, or labels with no vote), oldest first."""
    for t in reversed(read_feedback(engine, since_id=since_id).thumbs):
        row = {"prompt": t.prompt, "completion": _reply(t.reply), "label": t.label > 0}
        if t.labels:  # users' labels on the answer (harmful, untrue, ...)
            row["labels"] = list(t.labels)
        yield row


def labels_by_message(engine: Engine, message_ids: list[int]) -> dict[int, list[str]]:
    """The distinct labels users put on each of these messages, sorted."""
    out: dict[int, set[str]] = {}
    with session(engine) as s:
        for i in range(0, len(message_ids), 500):
            chunk = message_ids[i : i + 500]
            rows = s.exec(
                select(Label.message_id, Label.label).where(col(Label.message_id).in_(chunk))
            ).all()
            for message_id, label in rows:
                out.setdefault(message_id, set()).add(label)
    return {m: sorted(v) for m, v in out.items()}


def export_messages(engine: Engine, since_id: int = 0) -> Iterator[dict[str, Any]]:
    """TRL conversational SFT rows ``{"messages": [...prompt, reply]}`` for thumbs-up replies,
    oldest first."""
    for t in reversed(read_feedback(engine, since_id=since_id).thumbs):
        if t.label > 0:
            yield {"messages": t.prompt + _reply(t.reply)}
