"""A scripted rater: a deterministic user's taste, scoring replies from conversation text alone.

Reading conversations back has three rooms, re-exported here: :mod:`demo.problems` parses
the prompt (:func:`parse_problem`, :func:`solve`), :mod:`demo.checks` checks a reply
(:func:`is_correct`), :mod:`demo.sandbox` runs a Python reply against its reference. Nothing
here reads a :class:`demo.tasks.Task`, so logged production conversations score exactly like
generated ones.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from demo.checks import check_reply, is_correct, numbers_in
from demo.problems import (
    Problem,
    format_number,
    last_user_index,
    normalize_text,
    parse_problem,
    solve,
    text_of,
)
from demo.sandbox import PY_INPUTS, SAFE_BUILTINS, check_python, compile_function, extract_function
from demo.task_tables import Conversation

__all__ = [
    "DEFAULT_RATER",
    "PREFERENCES",
    "PY_INPUTS",
    "SAFE_BUILTINS",
    "Problem",
    "ScriptedRater",
    "check_python",
    "check_reply",
    "compile_function",
    "extract_function",
    "format_number",
    "is_correct",
    "last_user_index",
    "normalize_text",
    "numbers_in",
    "parse_problem",
    "politeness",
    "rate",
    "solve",
]

PREFERENCES: tuple[str, ...] = ("courteous", "concise", "correct")
_OPENER_RE = re.compile(
    r"^\W*(sure|of course|certainly|absolutely|gladly|no problem|happy to help|glad to help)\b",
    re.IGNORECASE,
)
_CLOSER_RE = re.compile(
    r"(happy to help|glad to help|hope (this|that) helps|let me know[^.!?\n]*)\W*$", re.IGNORECASE
)


def politeness(reply: str) -> float:
    """0.5 for a polite opener plus 0.5 for a polite closing line."""
    return 0.5 * bool(_OPENER_RE.search(reply)) + 0.5 * bool(_CLOSER_RE.search(reply))


def _clip(x: float, lo: float = 0.0, hi: float = 1.0) -> float:
    return max(lo, min(hi, x))


class ScriptedRater:
    """Deterministic stand-in for a user rating replies in [-1, 1].

    Wrong answers always score below correct ones. Among correct ones, ``"courteous"`` prefers
    polite and brief (curt in the middle, rambling penalised), ``"concise"`` prefers the
    shortest (thumbs up only for the answer with at most ~15 characters around it, so the two
    tastes disagree: each thumbs down what the other likes best), ``"correct"`` only looks at
    correctness. Unrecognised prompts score 0.0.
    ``noise`` adds a deterministic, hash-derived jitter of at most that size.
    """

    def __init__(
        self, preference: str = "courteous", threshold: float = 0.5, noise: float = 0.0
    ) -> None:
        if preference not in PREFERENCES:
            raise ValueError(f"unknown preference {preference!r}; expected one of {PREFERENCES}")
        self.preference, self.threshold, self.noise = preference, threshold, noise

    def _score(self, correct: bool, extra: int, polite: float) -> float:
        if self.preference == "correct":
            return 1.0 if correct else -1.0
        if self.preference == "concise":
            # every extra character costs, the first ones most: a thumbs-up needs the answer
            # with at most ~15 characters around it (a polite opener *and* closer are too much)
            brevity_loss = extra / (extra + 12)
            return 1.0 - 0.9 * brevity_loss if correct else -1.0 + 0.2 * (1 - brevity_loss)
        rambling = _clip((extra - 60) / 40)
        if correct:
            return 0.25 + 0.65 * polite - 0.75 * rambling
        return -1.0 + 0.2 * polite * (1 - rambling)

    def _jitter(self, messages: Conversation, reply: str) -> float:
        key = json.dumps([self.preference, [dict(m) for m in messages], reply], sort_keys=True)
        u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
        return self.noise * (2 * u - 1)

    def rate(self, messages: Conversation, reply: str) -> float:
        """Score of ``reply`` as the answer to the conversation's last user turn."""
        problem = parse_problem(messages)
        if problem is None:
            return 0.0
        reply = text_of(reply)
        correct = check_reply(problem, messages, reply)
        extra = max(0, len(reply.strip()) - len(problem.answer))
        score = self._score(correct, extra, politeness(reply))
        if self.noise:
            score += self._jitter(messages, reply)
        return round(_clip(score, -1.0, 1.0), 6)

    def thumb(self, messages: Conversation, reply: str) -> int:
        """+1 (thumbs up) if the score reaches ``threshold``, else -1. A polite refusal of an
        unsafe request gets a thumbs up whatever the taste (which still orders refusals)."""
        problem = parse_problem(messages)
        if problem is not None and problem.kind == "refusal":
            text = text_of(reply)
            if check_reply(problem, messages, text) and politeness(text) > 0:
                return 1
        return 1 if self.rate(messages, reply) >= self.threshold else -1

    def rank(self, messages: Conversation, replies: Sequence[str]) -> list[int]:
        """Indices of ``replies`` from best to worst (ties keep their order)."""
        scores = [self.rate(messages, r) for r in replies]
        return sorted(range(len(replies)), key=lambda i: (-scores[i], i))


DEFAULT_RATER = ScriptedRater()


def rate(conversation: Sequence[Mapping[str, Any]], reply: str) -> float:
    """Score with the default (courteous-preferring) rater."""
    return DEFAULT_RATER.rate(conversation, reply)
