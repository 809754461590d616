"""Seeded synthetic chat tasks: the SFT corpus, RLHF prompts and held-out evaluation set.

Every task is a short ASCII conversation built from a few regular templates, so a tiny
byte-level-BPE policy can learn it on CPU. The tables and templates live in
:mod:`demo.task_tables`, one generator per family in :mod:`demo.task_families`. The text-only
side (``solve``, ``parse_problem``, ``is_correct``, ``check_python``, ``ScriptedRater``,
``rate``) lives in :mod:`demo.rater` and is re-exported from here.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from demo.rater import (
    Problem,
    ScriptedRater,
    check_python,
    is_correct,
    parse_problem,
    rate,
    solve,
)
from demo.task_families import GENERATORS, render_replies
from demo.task_tables import PY_SPECS, Conversation, Message

__all__ = [
    "CORRECT_STYLES",
    "DEFAULT_STYLE_WEIGHTS",
    "FAMILIES",
    "HELDOUT_PERCENT",
    "PY_SPECS",
    "SPLITS",
    "STYLES",
    "Problem",
    "ScriptedRater",
    "Task",
    "TaskGenerator",
    "check_python",
    "is_correct",
    "parse_problem",
    "rate",
    "sft_conversations",
    "solve",
    "split_of",
]

FAMILIES: tuple[str, ...] = (
    "arithmetic",
    "units",
    "reverse",
    "count",
    "capital",
    "sort",
    "email",
    "python",
    "followup",
)
STYLES: tuple[str, ...] = ("courteous", "curt", "rambling", "wrong")
CORRECT_STYLES: tuple[str, ...] = ("courteous", "curt", "rambling")
DEFAULT_STYLE_WEIGHTS: dict[str, float] = {
    "courteous": 0.35,
    "curt": 0.35,
    "rambling": 0.2,
    "wrong": 0.1,
}
HELDOUT_PERCENT = 10
SPLITS: tuple[str, ...] = ("train", "heldout")


def split_of(messages: Conversation) -> str:
    """'heldout' for ~HELDOUT_PERCENT% of first user messages (by hash), else 'train'.

    Keyed on the first user message so a follow-up conversation lands in the same split as its
    opening question.
    """
    first = next((m.get("content") for m in messages if m.get("role") == "user"), "")
    first = first if isinstance(first, str) else ""
    digest = hashlib.sha256(" ".join(first.split()).lower().encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT else "train"


# --------------------------------------------------------------------------- generation


@dataclass
class Task:
    """One prompt with its canonical answer and one reply per style."""

    family: str
    messages: list[Message]
    answer: str
    replies: dict[str, str] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The final user message."""
        return self.messages[-1]["content"]

    @property
    def split(self) -> str:
        """'train' or 'heldout'."""
        return split_of(self.messages)

    def conversation(self, style: str = "courteous") -> list[Message]:
        """Prompt messages followed by the reply in ``style``."""
        return [dict(m) for m in self.messages] + [
            {"role": "assistant", "content": self.replies[style]}
        ]


def _consistent(task: Task) -> bool:
    """Generated data must agree with the text-only checker (guards rare collisions)."""
    if solve(task.messages) != task.answer:
        return False
    texts = [m["content"] for m in task.messages] + list(task.replies.values())
    if not all(t.isascii() for t in texts):
        return False
    if any(is_correct(task.messages, task.replies[s]) is not True for s in CORRECT_STYLES):
        return False
    return is_correct(task.messages, task.replies["wrong"]) is False


class TaskGenerator:
    """Deterministic stream of tasks: the same seed gives the same sequence."""

    max_tries = 2000

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._rng = random.Random(seed)

    def sample(self, family: str | None = None, split: str | None = None) -> Task:
        """One task of ``family`` (random if None), optionally restricted to a split."""
        if family is not None and family not in GENERATORS:
            raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        fam = family or self._rng.choice(FAMILIES)
        for _ in range(self.max_tries):
            draft = GENERATORS[fam](self._rng)
            if split is not None and split_of(draft.messages) != split:
                continue
            task = Task(fam, draft.messages, draft.answer, render_replies(draft, self._rng))
            if _consistent(task):
                return task
        raise RuntimeError(f"could not generate a {fam!r} task for split {split!r}")

    def iter_tasks(
        self, n: int, split: str | None = "train", family: str | None = None
    ) -> Iterator[Task]:
        """``n`` tasks from ``split`` ('train', 'heldout', or None for both)."""
        for _ in range(n):
            yield self.sample(family, split=split)


def sft_conversations(
    n: int, seed: int, style_weights: Mapping[str, float] | None = None
) -> list[list[Message]]:
    """``n`` train-split conversations ending in an assistant reply of a randomly drawn style."""
    weights = dict(DEFAULT_STYLE_WEIGHTS if style_weights is None else style_weights)
    unknown = set(weights) - set(STYLES)
    if unknown or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"bad style_weights {weights!r}; styles are {STYLES}")
    styles, probs = list(weights), list(weights.values())
    style_rng = random.Random(f"sft-styles-{seed}")
    return [
        task.conversation(style_rng.choices(styles, probs)[0])
        for task in TaskGenerator(seed).iter_tasks(n, split="train")
    ]
