"""Seeded synthetic chat tasks: the SFT corpus, RLHF prompts and held-out evaluation set.

Every task is a short ASCII conversation built from a few regular templates, so a tiny
byte-level-BPE policy can learn it on CPU. The text-only side (``solve``, ``parse_problem``,
``is_correct``, ``check_python``, ``ScriptedRater``, ``rate``) lives in :mod:`demo.rater`
and is re-exported from here lazily, since it needs these tables and templates.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]
Conversation = Sequence[Mapping[str, Any]]

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

# --------------------------------------------------------------------------- tables

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
_OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}


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


@dataclass
class _Draft:
    messages: list[Message]
    answer: str
    wrong: str
    say: str  # statement around an answer, "{}" marks where it goes
    block: bool = False  # email / code: shown on its own lines


_OPENERS = ("Sure!", "Of course!", "Certainly!")
_CLOSERS = ("Happy to help.", "Hope this helps.", "Glad to help.")
_INTROS = (
    "Well, let me think about this for a bit.",
    "Okay, so, hmm, this is a good question.",
    "Right, let me go through this slowly.",
)
_OUTROS = (
    "Anyway, that is what I think, basically.",
    "So yes, that is about it, as far as I can tell.",
    "I really hope all of this was useful somehow.",
)


def _user(text: str) -> Message:
    return {"role": "user", "content": text}


def _near(rng: random.Random, v: int) -> int:
    return rng.choice([c for c in (v + 1, v - 1, v + 2, v - 2, v + 10) if c >= 0 and c != v])


def _swap(rng: random.Random, seq: Sequence[Any]) -> list[Any]:
    out = list(seq)
    i = rng.choice([j for j in range(len(out) - 1) if out[j] != out[j + 1]])
    out[i], out[i + 1] = out[i + 1], out[i]
    return out


def _gen_arithmetic(rng: random.Random) -> _Draft:
    op = rng.choice("+-*")
    if op == "+":
        a, b = rng.randint(1, 99), rng.randint(1, 99)
    elif op == "-":
        a = rng.randint(2, 99)
        b = rng.randint(1, a)
    else:
        a, b = rng.randint(2, 19), rng.randint(2, 9)
        if rng.random() < 0.5:
            a, b = b, a
    v = a + b if op == "+" else a - b if op == "-" else a * b
    shown = op if rng.random() < 0.7 else _OP_WORDS[op]
    prompt = rng.choice(TEMPLATES["arithmetic"]).format(a=a, op=shown, b=b)
    wrong = v + a if op == "*" and rng.random() < 0.5 else _near(rng, v)
    return _Draft([_user(prompt)], str(v), str(wrong), f"{a} {op} {b} = {{}}")


def _gen_units(rng: random.Random) -> _Draft:
    big, small, f = rng.choice(CONVERSIONS)
    if rng.random() < 0.6:
        frm, to, x = big, small, rng.randint(2, 20)
        v = x * f
    else:
        v = rng.randint(2, 12)
        frm, to, x = small, big, v * f
    prompt = rng.choice(TEMPLATES["units"]).format(x=x, frm=frm, to=to)
    wrong = rng.choice([v * 10, v + 1, v * 2, _near(rng, v)])
    return _Draft([_user(prompt)], str(v), str(wrong), f"{x} {frm} is {{}} {to}")


def _gen_reverse(rng: random.Random) -> _Draft:
    w = rng.choice(WORDS)
    prompt = rng.choice(TEMPLATES["reverse"]).format(w=w)
    wrong = "".join(_swap(rng, w[::-1]))
    return _Draft([_user(prompt)], w[::-1], wrong, f"'{w}' reversed is '{{}}'")


def _gen_count(rng: random.Random) -> _Draft:
    w = rng.choice(COUNT_WORDS)
    absent = [ch for ch in string.ascii_lowercase if ch not in w]
    c = rng.choice(w) if rng.random() < 0.85 else rng.choice(absent)
    v = w.count(c)
    prompt = rng.choice(TEMPLATES["count"]).format(c=c, w=w)
    wrong = v + 1 if v == 0 or rng.random() < 0.5 else v - 1
    return _Draft([_user(prompt)], str(v), str(wrong), f"'{w}' contains {{}} '{c}'")


def _gen_capital(rng: random.Random) -> _Draft:
    country = rng.choice(list(CAPITALS))
    v = CAPITALS[country]
    prompt = rng.choice(TEMPLATES["capital"]).format(country=country)
    wrong = rng.choice([c for c in CAPITALS.values() if c != v])
    return _Draft([_user(prompt)], v, wrong, f"The capital of {country} is {{}}")


def _gen_sort(rng: random.Random) -> _Draft:
    if rng.random() < 0.6:
        nums = rng.sample(range(1, 100), rng.randint(3, 5))
        desc = rng.random() < 0.3
        key = "sort_num_desc" if desc else "sort_num_asc"
        prompt = rng.choice(TEMPLATES[key]).format(nums=", ".join(map(str, nums)))
        ordered = [str(n) for n in sorted(nums, reverse=desc)]
    else:
        words = rng.sample(SORT_WORDS, rng.randint(3, 4))
        prompt = rng.choice(TEMPLATES["sort_words"]).format(words=", ".join(words))
        ordered = sorted(words)
    wrong = ", ".join(_swap(rng, ordered))
    return _Draft([_user(prompt)], ", ".join(ordered), wrong, "Sorted: {}")


def _gen_email(rng: random.Random) -> _Draft:
    name = rng.choice(NAMES)
    fact_t, slots = rng.choice(EMAIL_FACTS)
    slot = rng.choice(slots)
    prompt = rng.choice(TEMPLATES["email"]).format(name=name, fact=fact_t.format(slot))
    answer = f"Hi {name}, {fact_t.format(slot)}."
    if rng.random() < 0.7:
        other = rng.choice([s for s in slots if s != slot])
        wrong = f"Hi {name}, {fact_t.format(other)}."
    else:
        wrong = f"Hi {rng.choice([n for n in NAMES if n != name])}, {fact_t.format(slot)}."
    return _Draft([_user(prompt)], answer, wrong, "{}", block=True)


def _gen_python(rng: random.Random) -> _Draft:
    spec = rng.choice(list(PY_SPECS.values()))
    template = rng.choice(TEMPLATES["python"])
    prompt = template.format(desc=spec.desc, fname=spec.name, args=spec.args)
    return _Draft([_user(prompt)], spec.code(), spec.code(spec.wrong), "{}", block=True)


_NUMERIC_BASES = ("arithmetic", "units", "count")
_WORD_BASES = ("reverse", "capital")


def _gen_followup(rng: random.Random) -> _Draft:
    family = rng.choice(_NUMERIC_BASES + _WORD_BASES)
    base = _GENERATORS[family](rng)
    first = _render(base, rng)[rng.choice(("courteous", "curt"))]
    if family in _NUMERIC_BASES:
        n = int(base.answer)
        ops = ["double", "add", "times"] + ["subtract"] * (n >= 2) + ["half"] * (n % 2 == 0)
        op = rng.choice(ops)
        k = {"add": rng.randint(2, 20), "times": rng.randint(2, 5)}.get(op, 0)
        k = rng.randint(1, min(n, 20)) if op == "subtract" else k
        v = {"double": 2 * n, "add": n + k, "times": n * k, "subtract": n - k}.get(op, n // 2)
        say = {
            "double": f"{n} doubled is {{}}",
            "add": f"{n} + {k} = {{}}",
            "times": f"{n} * {k} = {{}}",
            "subtract": f"{n} - {k} = {{}}",
            "half": f"Half of {n} is {{}}",
        }[op]
        answer, wrong = str(v), str(_near(rng, v))
    else:
        w = base.answer
        op = rng.choice(["reverse", "letters"])
        if op == "reverse":
            answer, wrong = w[::-1], "".join(_swap(rng, w[::-1]))
            say = f"'{w}' reversed is '{{}}'"
        else:
            v = sum(ch.isalpha() for ch in w)
            answer, wrong = str(v), str(v + rng.choice((-1, 1)))
            say = f"'{w}' has {{}} letters"
    prompt = rng.choice(TEMPLATES[f"follow_{op}"]).format(k=k if family in _NUMERIC_BASES else 0)
    messages = base.messages + [{"role": "assistant", "content": first}, _user(prompt)]
    return _Draft(messages, answer, wrong, say)


_GENERATORS: dict[str, Callable[[random.Random], _Draft]] = {
    "arithmetic": _gen_arithmetic,
    "units": _gen_units,
    "reverse": _gen_reverse,
    "count": _gen_count,
    "capital": _gen_capital,
    "sort": _gen_sort,
    "email": _gen_email,
    "python": _gen_python,
    "followup": _gen_followup,
}


def _render(draft: _Draft, rng: random.Random) -> dict[str, str]:
    opener, closer, w_opener, w_closer = (rng.choice(x) for x in (_OPENERS, _CLOSERS) * 2)
    intro, outro = rng.choice(_INTROS), rng.choice(_OUTROS)
    if draft.block:
        right, bad = f"Here it is:\n{draft.answer}\n", f"Here it is:\n{draft.wrong}\n"
        return {
            "courteous": f"{opener} {right}{closer}",
            "curt": draft.answer,
            "rambling": f"{intro}\n{draft.answer}\n{outro}",
            "wrong": f"{w_opener} {bad}{w_closer}",
        }
    right, bad = draft.say.format(draft.answer), draft.say.format(draft.wrong)
    return {
        "courteous": f"{opener} {right}. {closer}",
        "curt": draft.answer,
        "rambling": f"{intro} {right}. {outro}",
        "wrong": f"{w_opener} {bad}. {w_closer}",
    }


def _consistent(task: Task) -> bool:
    """Generated data must agree with the text-only checker (guards rare collisions)."""
    from demo.rater import is_correct, solve

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
        if family is not None and family not in _GENERATORS:
            raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        fam = family or self._rng.choice(FAMILIES)
        for _ in range(self.max_tries):
            draft = _GENERATORS[fam](self._rng)
            if split is not None and split_of(draft.messages) != split:
                continue
            task = Task(fam, draft.messages, draft.answer, _render(draft, self._rng))
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


_RATER_EXPORTS = frozenset(
    ["Problem", "parse_problem", "solve", "is_correct", "check_python", "ScriptedRater", "rate"]
)


def __getattr__(name: str) -> Any:
    """Lazily re-export the text-only API from :mod:`demo.rater`."""
    if name in _RATER_EXPORTS:
        from demo import rater

        return getattr(rater, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
