"""The vocabulary of the synthetic chat tasks: word lists, facts and tiny Python specs.

The prompt templates each family is written in live in :mod:`demo.phrasings`; the chat
families beyond the tasks (small talk, out of scope, unsafe) in :mod:`demo.chat_tables`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Message = dict[str, str]
Conversation = Sequence[Mapping[str, Any]]

CAPITALS: dict[str, str] = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Canada": "Ottawa", "Australia": "Canberra",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago",
    "Russia": "Moscow", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara", "Ireland": "Dublin",
    "Austria": "Vienna", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Cuba": "Havana",
    "Morocco": "Rabat", "Nigeria": "Abuja",
}  # fmt: skip
WORDS: tuple[str, ...] = (
    "apple", "banana", "planet", "garden", "river", "pencil", "window", "guitar", "rocket",
    "castle", "orange", "silver", "bottle", "candle", "dragon", "forest", "island", "jacket",
    "kitten", "lemon", "marble", "needle", "pepper", "rabbit", "sunset", "tomato", "violet",
    "wizard", "yellow", "zebra", "cloud", "dream", "flame", "ghost", "honey", "light", "music",
    "night", "ocean", "piano", "queen", "stone", "tiger", "water", "bread", "chair", "horse",
    "money", "paper", "robot", "smile", "train", "pirate", "mirror", "spider", "winter",
)  # fmt: skip
COUNT_WORDS: tuple[str, ...] = WORDS + (
    "mississippi", "strawberry", "committee", "bookkeeper", "balloon", "coffee", "letter",
    "success", "assessment", "cinnamon", "hello", "parallel",
)  # fmt: skip
SORT_WORDS: tuple[str, ...] = (
    "apple", "cherry", "fig", "grape", "kiwi", "lemon", "lime", "mango", "melon", "olive",
    "peach", "pear", "plum", "cat", "dog", "fox", "owl", "wolf", "bear", "deer",
)  # fmt: skip
NAMES: tuple[str, ...] = (
    "Sam", "Alex", "Maria", "Tom", "Priya", "Lena", "Omar", "Kim",
    "Jack", "Nina", "Leo", "Zoe", "Ben", "Ana", "Raj", "Eva",
)  # fmt: skip
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_HOURS = tuple(str(h) for h in range(1, 12))
EMAIL_FACTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("the meeting moved to {}", _DAYS),
    ("the report is due on {}", _DAYS),
    ("the office is closed on {}", _DAYS),
    ("the party is on {}", _DAYS),
    ("lunch is at {} pm", _HOURS),
    ("the call starts at {} pm", _HOURS),
    ("the train leaves at {} am", _HOURS),
)
# (bigger unit, smaller unit, factor): 1 bigger == factor smaller.
CONVERSIONS: tuple[tuple[str, str, int], ...] = (
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("centimeters", "millimeters", 10),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
)


@dataclass(frozen=True)
class PySpec:
    """A tiny Python function: described in words, reference body is one expression."""

    name: str
    args: str
    desc: str
    expr: str
    wrong: str

    def code(self, expr: str | None = None, name: str | None = None) -> str:
        """Source of ``def name(args): return expr``."""
        return f"def {name or self.name}({self.args}):\n    return {expr or self.expr}"


PY_SPECS: dict[str, PySpec] = {
    s.name: s
    for s in (
        PySpec("square", "x", "the square of x", "x * x", "x + x"),
        PySpec("cube", "x", "the cube of x", "x * x * x", "x * 3"),
        PySpec("double", "x", "twice x", "2 * x", "x * x"),
        PySpec("triple", "x", "three times x", "3 * x", "x + 3"),
        PySpec("add_one", "x", "x plus one", "x + 1", "x - 1"),
        PySpec("sub_one", "x", "x minus one", "x - 1", "1 - x"),
        PySpec("negate", "x", "the negative of x", "-x", "abs(x)"),
        PySpec("half", "x", "half of x rounded down", "x // 2", "x / 2"),
        PySpec("is_even", "x", "whether x is even", "x % 2 == 0", "x % 2 == 1"),
        PySpec("is_positive", "x", "whether x is positive", "x > 0", "x >= 0"),
        PySpec("add", "a, b", "the sum of a and b", "a + b", "a * b"),
        PySpec("subtract", "a, b", "a minus b", "a - b", "b - a"),
        PySpec("multiply", "a, b", "the product of a and b", "a * b", "a + b"),
        PySpec("bigger", "a, b", "the larger of a and b", "max(a, b)", "min(a, b)"),
        PySpec("smaller", "a, b", "the smaller of a and b", "min(a, b)", "max(a, b)"),
        PySpec("first_char", "s", "the first character of s", "s[0]", "s[-1]"),
        PySpec("last_char", "s", "the last character of s", "s[-1]", "s[0]"),
        PySpec("reverse", "s", "s reversed", "s[::-1]", "s[1:]"),
        PySpec("length", "s", "the length of s", "len(s)", "len(s) - 1"),
    )
}
