"""Reading a prompt back: which task a conversation's last user turn asks, and its answer.

Works from conversation text alone, never from a :class:`demo.tasks.Task`, so logged
production conversations read exactly like generated ones. Each template of
:mod:`demo.task_tables` is compiled to a regex and matched against the last user turn.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from typing import Any

from demo.task_tables import CAPITALS, CONVERSIONS, PY_SPECS, TEMPLATES, Conversation, PySpec

_UNIT_FACTORS: dict[tuple[str, str], Fraction] = {
    pair: factor
    for big, small, f in CONVERSIONS
    for pair, factor in (((big, small), Fraction(f)), ((small, big), Fraction(1, f)))
}
_PY_BY_DESC: dict[str, PySpec] = {s.desc: s for s in PY_SPECS.values()}

_OPS = {"+": "+", "plus": "+", "-": "-", "minus": "-", "*": "*", "x": "*", "times": "*"}


def _alternation(options: Sequence[str]) -> str:
    return "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True))


_SLOT_PATTERNS: dict[str, str] = {
    "a": r"\d{1,4}",
    "b": r"\d{1,4}",
    "x": r"\d{1,6}",
    "k": r"\d{1,4}",
    "op": r"\+|-|\*|x|plus|minus|times",
    "frm": _alternation([u for pair in _UNIT_FACTORS for u in pair]),
    "to": _alternation([u for pair in _UNIT_FACTORS for u in pair]),
    "w": r"[a-z]+",
    "c": r"[a-z]",
    "country": _alternation(list(CAPITALS)),
    "nums": r"\d{1,4}(?:\s*,\s*\d{1,4})+",
    "words": r"[a-z]+(?:\s*,\s*[a-z]+)+",
    "name": r"[a-z]+",
    "fact": r".+",
    "desc": _alternation(list(_PY_BY_DESC)),
    "fname": r"[a-z_][a-z0-9_]*",
    "args": r"[a-z_][a-z0-9_, ]*",
}


def normalize_text(text: str) -> str:
    """Collapse whitespace, straighten quotes and drop trailing punctuation."""
    text = text.replace("\u2018", "'").replace("\u2019", "'").replace("\u201c", '"')
    text = text.replace("\u201d", '"')
    return " ".join(text.split()).rstrip(" .?!")


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", normalize_text(template))
    out = [
        f"(?P<{p}>{_SLOT_PATTERNS[p]})" if i % 2 else re.escape(p).replace(r"\ ", r"\s*")
        for i, p in enumerate(parts)
    ]
    return re.compile("".join(out), re.IGNORECASE)


@dataclass(frozen=True)
class Problem:
    """What a conversation's last user turn asks for, recovered from its text."""

    family: str
    kind: str  # "number" | "word" | "sequence" | "email" | "python"
    answer: str
    items: tuple[str, ...] = ()  # sequence: the items in their correct order
    numeric: bool = False  # sequence: items are numbers
    name: str = ""  # email recipient
    fact: str = ""  # email key fact
    func: str = ""  # python: key into PY_SPECS


def format_number(value: Fraction | int) -> str:
    """Integers plainly, other fractions as a short decimal."""
    q = Fraction(value)
    if q.denominator == 1:
        return str(q.numerator)
    return f"{float(q):.4f}".rstrip("0").rstrip(".")


def _num(family: str, value: Fraction | int) -> Problem:
    return Problem(family, "number", format_number(value))


def _p_arithmetic(g: dict[str, str], _ctx: Conversation) -> Problem | None:
    a, b, op = int(g["a"]), int(g["b"]), _OPS[g["op"].lower()]
    return _num("arithmetic", a + b if op == "+" else a - b if op == "-" else a * b)


def _p_units(g: dict[str, str], _ctx: Conversation) -> Problem | None:
    factor = _UNIT_FACTORS.get((g["frm"].lower(), g["to"].lower()))
    return None if factor is None else _num("units", int(g["x"]) * factor)


def _p_reverse(g: dict[str, str], _ctx: Conversation) -> Problem | None:
    return Problem("reverse", "word", g["w"][::-1])


def _p_count(g: dict[str, str], _ctx: Conversation) -> Problem | None:
    return _num("count", g["w"].lower().count(g["c"].lower()))


_CAPITALS_LOWER = {k.lower(): v for k, v in CAPITALS.items()}


def _p_capital(g: dict[str, str], _ctx: Conversation) -> Problem | None:
    return Problem("capital", "word", _CAPITALS_LOWER[g["country"].lower()])


def _p_sort(g: dict[str, str], ctx: Conversation, desc: bool) -> Problem | None:
    numeric = "nums" in g
    raw = [s.strip().lower() for s in (g.get("nums") or g["words"]).split(",")]
    key: Callable[[str], Any] = int if numeric else str
    items = tuple(str(key(s)) for s in sorted(raw, key=key, reverse=desc))
    return Problem("sort", "sequence", ", ".join(items), items=items, numeric=numeric)


def _p_email(g: dict[str, str], _ctx: Conversation) -> Problem | None:
    name = g["name"][:1].upper() + g["name"][1:]
    fact = g["fact"].strip().rstrip(" .?!")
    if not fact:
        return None
    return Problem("email", "email", f"Hi {name}, {fact}.", name=name, fact=fact)


def _p_python(g: dict[str, str], _ctx: Conversation) -> Problem | None:
    spec = _PY_BY_DESC[g["desc"].lower()]
    fname = g.get("fname") or spec.name
    return Problem("python", "python", spec.code(name=fname), func=spec.name)


def _p_follow(g: dict[str, str], ctx: Conversation, op: str) -> Problem | None:
    users = [i for i, m in enumerate(ctx) if m.get("role") == "user"]
    if len(users) < 2:
        return None
    base = parse_problem(ctx[: users[-2] + 1])
    if base is None:
        return None
    if op in ("reverse", "letters"):
        if base.kind != "word":
            return None
        if op == "reverse":
            return Problem("followup", "word", base.answer[::-1])
        return _num("followup", sum(ch.isalpha() for ch in base.answer))
    if base.kind != "number":
        return None
    n, k = Fraction(base.answer), Fraction(g.get("k", 0))
    ops: dict[str, Fraction] = {
        "double": 2 * n,
        "add": n + k,
        "times": n * k,
        "subtract": n - k,
        "half": n / 2,
    }
    return _num("followup", ops[op])


_Handler = Callable[[dict[str, str], Conversation], Problem | None]


def _parsers() -> list[tuple[re.Pattern[str], _Handler]]:
    handlers: dict[str, _Handler] = {
        "arithmetic": _p_arithmetic,
        "units": _p_units,
        "reverse": _p_reverse,
        "count": _p_count,
        "capital": _p_capital,
        "sort_num_asc": lambda g, c: _p_sort(g, c, desc=False),
        "sort_num_desc": lambda g, c: _p_sort(g, c, desc=True),
        "sort_words": lambda g, c: _p_sort(g, c, desc=False),
        "email": _p_email,
        "python": _p_python,
    }
    for key in TEMPLATES:
        if key.startswith("follow_"):
            op = key.removeprefix("follow_")
            handlers[key] = partial(_p_follow, op=op)
    return [(_compile(t), handlers[key]) for key, ts in TEMPLATES.items() for t in ts]


_PARSERS = _parsers()


def text_of(value: Any) -> str:
    """A message's content if it is text, else the empty string."""
    return value if isinstance(value, str) else ""


def last_user_index(messages: Conversation) -> int | None:
    """Index of the last user message, or None."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    return None


def parse_problem(messages: Conversation) -> Problem | None:
    """Recognise the last user turn against the known templates (None if unrecognised)."""
    idx = last_user_index(messages)
    if idx is None:
        return None
    ctx = messages[: idx + 1]
    text = normalize_text(text_of(ctx[-1].get("content")))
    for regex, handler in _PARSERS:
        match = regex.fullmatch(text)
        if match:
            problem = handler(match.groupdict(), ctx)
            if problem is not None:
                return problem
    return None


def solve(messages: Conversation) -> str | None:
    """The canonical answer to the conversation's last user turn, from its text alone."""
    problem = parse_problem(messages)
    return None if problem is None else problem.answer
