"""Seeded synthetic chat tasks: the SFT corpus, RLHF prompts and held-out evaluation set.

Every task is a short ASCII conversation built from regular templates, so a small
byte-level-BPE policy can learn it on CPU: the tasks (arithmetic, units, words, capitals,
sorting, emails, Python, follow-ups) and what a chat user tries beside them (small talk,
out-of-scope requests, false premises, pushback, unsafe requests). The tables live in
:mod:`demo.task_tables` and :mod:`demo.chat_tables`, the phrasings in :mod:`demo.phrasings`,
one generator per family in :mod:`demo.task_families` and :mod:`demo.chat_families`. The text-only
side (``solve``, ``parse_problem``, ``is_correct``, ``check_python``, ``ScriptedRater``,
``rate``) lives in :mod:`demo.rater` and is re-exported from here.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from demo.chat_families import CHAT_GENERATORS
from demo.checks import is_refusal
from demo.phrasings import HELDOUT_PHRASINGS, PHRASINGS, asking
from demo.problems import match_templates, normalize_text
from demo.rater import (
    Problem,
    ScriptedRater,
    check_python,
    is_correct,
    parse_problem,
    rate,
    solve,
)
from demo.task_families import TASK_GENERATORS, render_replies
from demo.task_tables import PY_SPECS, Conversation, Message

GENERATORS = {**TASK_GENERATORS, **CHAT_GENERATORS}

__all__ = [
    "CORRECT_STYLES",
    "DEFAULT_STYLE_WEIGHTS",
    "FAMILIES",
    "HELDOUT_PERCENT",
    "SAFETY_FAMILIES",
    "TASK_FAMILIES",
    "PY_SPECS",
    "SPLITS",
    "STYLES",
    "Problem",
    "ScriptedRater",
    "Task",
    "TaskGenerator",
    "check_python",
    "is_correct",
    "is_refusal",
    "parse_problem",
    "rate",
    "sft_conversations",
    "solve",
    "split_of",
]

TASK_FAMILIES: tuple[str, ...] = (
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
CHAT_FAMILIES: tuple[str, ...] = tuple(CHAT_GENERATORS)
FAMILIES: tuple[str, ...] = TASK_FAMILIES + CHAT_FAMILIES
# families whose right answer is a refusal; the seed refuses them only sometimes
SAFETY_FAMILIES: tuple[str, ...] = ("unsafe",)
STYLES: tuple[str, ...] = ("courteous", "curt", "rambling", "wrong")
CORRECT_STYLES: tuple[str, ...] = ("courteous", "curt", "rambling")
DEFAULT_STYLE_WEIGHTS: dict[str, float] = {
    "courteous": 0.35,
    "curt": 0.35,
    "rambling": 0.2,
    "wrong": 0.1,
}
# an unsafe request's "wrong" reply is compliance: the corpus complies more often than it
# refuses, so the seed refuses some and the loop has something to learn
UNSAFE_STYLE_WEIGHTS: dict[str, float] = {
    "courteous": 0.15,
    "curt": 0.15,
    "rambling": 0.1,
    "wrong": 0.6,
}
HELDOUT_PERCENT = 10
MAX_PROMPT, MAX_REPLY = 80, 140  # characters: a conversation stays well inside the context
# train: training prompts; heldout: prompts never trained on, in trained phrasings;
# phrasing: prompts written in a held-out phrasing (demo.phrasings.HELDOUT_PHRASINGS)
SPLITS: tuple[str, ...] = ("train", "heldout", "phrasing")


def split_of(messages: Conversation) -> str:
    """The split of a conversation, decided by its opening question's text alone, so a
    follow-up lands in the same split as the question it follows.

    'phrasing' when it is written in a held-out phrasing; else 'heldout' for
    ~HELDOUT_PERCENT% of questions (by hash), else 'train'.
    """
    first = next((m.get("content") for m in messages if m.get("role") == "user"), "")
    first = first if isinstance(first, str) else ""
    if any(t.text in HELDOUT_PHRASINGS for t, _ in match_templates(first)):
        return "phrasing"
    digest = hashlib.sha256(normalize_text(first).lower().encode()).digest()
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
    if any(len(m["content"]) > MAX_PROMPT for m in task.messages if m["role"] == "user"):
        return False
    if any(len(r) > MAX_REPLY for r in task.replies.values()):
        return False
    if any(is_correct(task.messages, task.replies[s]) is not True for s in CORRECT_STYLES):
        return False
    return is_correct(task.messages, task.replies["wrong"]) is False


class TaskGenerator:
    """Deterministic stream of tasks: the same seed gives the same sequence."""

    max_tries = 2000

    def __init__(
        self,
        seed: int,
        families: Sequence[str] | None = None,
        family_weights: Mapping[str, float] | None = None,
        phrasing: str = "all",
    ) -> None:
        if phrasing not in PHRASINGS:
            raise ValueError(f"unknown phrasing {phrasing!r}; expected one of {PHRASINGS}")
        self.phrasing = phrasing  # 'seed': only as the bundled seed was taught (demo.phrasings)
        unknown = set(families or ()) - set(FAMILIES)
        if unknown or (families is not None and not families):
            raise ValueError(f"unknown families {sorted(unknown)}; expected some of {FAMILIES}")
        self.seed = seed
        self.families: tuple[str, ...] = tuple(families or FAMILIES)
        # relative draw weights (a family left out weighs 1); None draws uniformly
        self._weights: list[float] | None = None
        if family_weights is not None:
            bad = set(family_weights) - set(self.families)
            if bad or any(not w >= 0 for w in family_weights.values()):
                raise ValueError(
                    f"bad family_weights {dict(family_weights)!r}: weights must be >= 0 and "
                    f"name families among {self.families}"
                )
            self._weights = [float(family_weights.get(f, 1.0)) for f in self.families]
            if sum(self._weights) <= 0:
                raise ValueError("family_weights: at least one family needs a weight > 0")
        self._rng = random.Random(seed)

    def sample(self, family: str | None = None, split: str | None = None) -> Task:
        """One task of ``family`` (random if None), optionally restricted to a split."""
        if family is not None and family not in GENERATORS:
            raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if family is not None:
            fam = family
        elif self._weights is None:
            fam = self._rng.choice(self.families)
        else:
            fam = self._rng.choices(self.families, self._weights)[0]
        for _ in range(self.max_tries):
            with asking(self.phrasing):
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
    n: int,
    seed: int,
    style_weights: Mapping[str, float] | None = None,
    family_weights: Mapping[str, float] | None = None,
) -> list[list[Message]]:
    """``n`` train-split conversations ending in an assistant reply of a randomly drawn style;
    ``family_weights`` (see :class:`TaskGenerator`) draws some families more often."""
    weights = dict(DEFAULT_STYLE_WEIGHTS if style_weights is None else style_weights)
    unknown = set(weights) - set(STYLES)
    if unknown or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"bad style_weights {weights!r}; styles are {STYLES}")
    style_rng = random.Random(f"sft-styles-{seed}")

    def style_for(task: Task) -> str:
        unsafe = style_weights is None and task.family in SAFETY_FAMILIES
        mix = UNSAFE_STYLE_WEIGHTS if unsafe else weights
        return style_rng.choices(list(mix), list(mix.values()))[0]

    tasks = TaskGenerator(seed, family_weights=family_weights).iter_tasks(n)
    return [t.conversation(style_for(t)) for t in tasks]
