"""The vocabulary of the synthetic chat tasks: word lists, facts, tiny Python specs and the
prompt templates each family is written in.

Both sides read these: :mod:`demo.task_families` writes prompts from them and
:mod:`demo.rater` compiles the same templates back into regexes to read prompts.
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

# --------------------------------------------------------------------------- templates

TEMPLATES: dict[str, tuple[str, ...]] = {
    "arithmetic": (
        "What is {a} {op} {b}?",
        "Compute {a} {op} {b}.",
        "Calculate {a} {op} {b}, please.",
        "What do you get for {a} {op} {b}?",
        "Quick math: {a} {op} {b} = ?",
    ),
    "units": (
        "How many {to} are in {x} {frm}?",
        "Convert {x} {frm} to {to}.",
        "{x} {frm} is how many {to}?",
        "What is {x} {frm} in {to}?",
    ),
    "reverse": (
        "Reverse the word '{w}'.",
        "Spell '{w}' backwards.",
        "What is '{w}' reversed?",
        "Write '{w}' backwards, please.",
    ),
    "count": (
        "How many '{c}' in '{w}'?",
        "Count the letter '{c}' in '{w}'.",
        "How many times does '{c}' appear in '{w}'?",
        "How often is the letter '{c}' in '{w}'?",
    ),
    "capital": (
        "What is the capital of {country}?",
        "Name the capital city of {country}.",
        "Which city is the capital of {country}?",
        "{country}: what is its capital?",
        "Tell me the capital of {country}.",
    ),
    "sort_num_asc": (
        "Sort these numbers: {nums}.",
        "Put {nums} in ascending order.",
        "Order from smallest to largest: {nums}.",
    ),
    "sort_num_desc": (
        "Sort {nums} from largest to smallest.",
        "Put {nums} in descending order.",
    ),
    "sort_words": (
        "Sort these words alphabetically: {words}.",
        "Put these words in alphabetical order: {words}.",
        "Alphabetize: {words}.",
    ),
    "email": (
        "Write a short email to {name} saying {fact}.",
        "Draft an email to {name}: {fact}.",
        "Email {name} that {fact}.",
        "Write {name} a brief email saying {fact}.",
        "Send {name} a short note that {fact}.",
    ),
    "python": (
        "Write a Python function that returns {desc}.",
        "Write a Python function {fname}({args}) that returns {desc}.",
        "Give me a Python function returning {desc}.",
        "In Python, define {fname}({args}) to return {desc}.",
    ),
    "follow_double": ("And double that?", "Now double it."),
    "follow_add": ("Now add {k} to that.", "What is that plus {k}?"),
    "follow_times": ("What is that times {k}?", "Now multiply it by {k}."),
    "follow_subtract": ("And subtract {k} from that?", "Now take away {k}."),
    "follow_half": ("What is half of that?", "And half of that?"),
    "follow_reverse": ("Now reverse it.", "Can you reverse that?", "And spelled backwards?"),
    "follow_letters": ("How many letters is that?", "How many letters does it have?"),
}
