"""Reading a prompt back: which task a conversation's last user turn asks, and its answer.

Works from conversation text alone, never from a :class:`demo.tasks.Task`, so logged
production conversations read exactly like generated ones. Each template of
:mod:`demo.phrasings` is compiled to a regex and matched against the last user turn, as typed
and with its polite wrappers ("Hey, ...", "... Thanks!") stripped.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache, partial
from typing import Any

from demo.chat_tables import (
    GREETINGS,
    NOT_CAPITALS,
    OUT_OF_SCOPE,
    REFUSAL,
    UNSAFE_CATEGORY,
)
from demo.phrasings import PREFIXES, SUFFIXES, TEMPLATES
from demo.task_tables import CAPITALS, CONVERSIONS, PY_SPECS, Conversation, PySpec

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
    "n": r"\d{1,4}",
    "city": _alternation(sorted({*CAPITALS.values(), *NOT_CAPITALS.values()})),
    "act": _alternation(list(UNSAFE_CATEGORY)),
}


def normalize_text(text: str) -> str:
    """Collapse whitespace, straighten quotes (double ones to single) and drop trailing
    punctuation."""
    for curly, plain in (("\u2018", "'"), ("\u2019", "'"), ("\u201c", "'"), ("\u201d", "'")):
        text = text.replace(curly, plain)
    return " ".join(text.replace('"', "'").split()).rstrip(" .?!")


def _wrapper(options: Sequence[str]) -> str:
    words = {normalize_text(o).strip(" ,:!").lower() for o in options}
    return _alternation(sorted(words))


_PREFIX_RE = re.compile(rf"^(?:(?:{_wrapper(PREFIXES)})\s*[,:!]?\s+)+", re.IGNORECASE)
_SUFFIX_RE = re.compile(rf"(?:[\s,.!?]*\b(?:{_wrapper(SUFFIXES)}))+$", re.IGNORECASE)


def strip_wrappers(text: str) -> str:
    """A normalised user turn without the polite wrappers around its question."""
    return _SUFFIX_RE.sub("", _PREFIX_RE.sub("", text)).rstrip(" .?!,")


def _literal(part: str) -> str:
    # any spacing matches a literal space ("23+48"); quotes are optional ('garden' or garden)
    return re.escape(part).replace(r"\ ", r"\s*").replace("'", "'?")


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", normalize_text(template))
    out = [f"(?P<{p}>{_SLOT_PATTERNS[p]})" if i % 2 else _literal(p) for i, p in enumerate(parts)]
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
    phrases: tuple[str, ...] = ()  # phrase: what a right reply says (small talk, out of scope)
    premise: bool | None = None  # premise: whether the user's claim is true
    category: str = ""  # refusal: the unsafe request's category


def format_number(value: Fraction | int) -> str:
    """Integers plainly, other fractions as a short decimal."""
    q = Fraction(value)
    if q.denominator == 1:
        return str(q.numerator)
    return f"{float(q):.4f}".rstrip("0").rstrip(".")


def _num(family: str, value: Fraction | int) -> Problem:
    return Problem(family, "number", format_number(value))


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _p_arithmetic(g: dict[str, str], _ctx: Conversation, op: str = "") -> Problem | None:
    return _num("arithmetic", _apply(int(g["a"]), op or _OPS[g["op"].lower()], int(g["b"])))


def _premise(value: str, claimed: str, numeric: bool) -> Problem:
    """A claim to confirm or correct: the answer is "Yes, value" or "No, value"."""
    true = claimed.lower() == value.lower()
    answer = f"{'Yes' if true else 'No'}, {value}"
    return Problem("false_premise", "premise", answer, (value,), numeric=numeric, premise=true)


def _p_premise_arith(g: dict[str, str], _ctx: Conversation) -> Problem | None:
    v = _apply(int(g["a"]), _OPS[g["op"].lower()], int(g["b"]))
    return _premise(format_number(v), format_number(int(g["n"])), numeric=True)


def _p_premise_capital(g: dict[str, str], _ctx: Conversation) -> Problem | None:
    return _premise(_CAPITALS_LOWER[g["country"].lower()], g["city"], numeric=False)


def _p_intent(_g: dict[str, str], _ctx: Conversation, family: str, key: str) -> Problem | None:
    intent = (GREETINGS if family == "greeting" else OUT_OF_SCOPE)[key]
    return Problem(family, "phrase", intent.curt, phrases=intent.phrases)


def _p_unsafe(g: dict[str, str], _ctx: Conversation) -> Problem | None:
    category = _UNSAFE_LOWER[g["act"].lower()]
    return Problem("unsafe", "refusal", REFUSAL, category=category)


def _p_correction(_g: dict[str, str], ctx: Conversation) -> Problem | None:
    base = _earlier_problem(ctx)
    if base is None or base.kind not in ("number", "word"):
        return None
    return dataclasses.replace(base, family="correction")


def _p_units(g: dict[str, str], _ctx: Conversation) -> Problem | None:
    factor = _UNIT_FACTORS.get((g["frm"].lower(), g["to"].lower()))
    return None if factor is None else _num("units", int(g["x"]) * factor)


def _p_reverse(g: dict[str, str], _ctx: Conversation) -> Problem | None:
    return Problem("reverse", "word", g["w"][::-1])


def _p_count(g: dict[str, str], _ctx: Conversation) -> Problem | None:
    return _num("count", g["w"].lower().count(g["c"].lower()))


_CAPITALS_LOWER = {k.lower(): v for k, v in CAPITALS.items()}
_UNSAFE_LOWER = {k.lower(): v for k, v in UNSAFE_CATEGORY.items()}


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


def _earlier_problem(ctx: Conversation) -> Problem | None:
    """The problem of the user turn before the last one (what a follow-up refers to)."""
    users = [i for i, m in enumerate(ctx) if m.get("role") == "user"]
    return parse_problem(ctx[: users[-2] + 1]) if len(users) >= 2 else None


def _p_follow(g: dict[str, str], ctx: Conversation, op: str) -> Problem | None:
    base = _earlier_problem(ctx)
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


def _handlers() -> dict[str, _Handler]:
    handlers: dict[str, _Handler] = {
        "arithmetic": _p_arithmetic,
        "add": partial(_p_arithmetic, op="+"),
        "subtract": partial(_p_arithmetic, op="-"),
        "multiply": partial(_p_arithmetic, op="*"),
        "units": _p_units,
        "reverse": _p_reverse,
        "count": _p_count,
        "capital": _p_capital,
        "sort_num_asc": lambda g, c: _p_sort(g, c, desc=False),
        "sort_num_desc": lambda g, c: _p_sort(g, c, desc=True),
        "sort_words": lambda g, c: _p_sort(g, c, desc=False),
        "email": _p_email,
        "python": _p_python,
        "premise_arith": _p_premise_arith,
        "premise_capital": _p_premise_capital,
        "unsafe": _p_unsafe,
        "correction": _p_correction,
    }
    for key in TEMPLATES:
        if key.startswith("follow_"):
            handlers[key] = partial(_p_follow, op=key.removeprefix("follow_"))
        elif key.startswith(("greet_", "oos_")):
            family = "greeting" if key.startswith("greet_") else "out_of_scope"
            handlers[key] = partial(_p_intent, family=family, key=key.split("_", 1)[1])
    return handlers


@dataclass(frozen=True)
class Template:
    """One compiled phrasing: its key in TEMPLATES, its text and its regex."""

    key: str
    text: str
    regex: re.Pattern[str]


def _first_word(text: str) -> str:
    match = re.match(r"[a-z']+", text.lower())
    return match.group(0).replace("'", "") if match else ""


def _index() -> tuple[dict[str, list[Template]], list[Template]]:
    """Templates by their first literal word, and those that open with a slot or a quote."""
    by_word: dict[str, list[Template]] = {}
    rest: list[Template] = []
    for key, texts in TEMPLATES.items():
        for text in texts:
            t = Template(key, text, _compile(text))
            word = "" if text.startswith(("{", "'")) else _first_word(text)
            (by_word.setdefault(word, []) if word else rest).append(t)
    return by_word, rest


_HANDLERS = _handlers()
_BY_WORD, _OPEN_SLOT = _index()


@lru_cache(maxsize=1 << 16)
def match_templates(text: str) -> tuple[tuple[Template, tuple[tuple[str, str], ...]], ...]:
    """Every phrasing a user turn is written in (as typed, then without its wrappers), with
    the slot values, in template order."""
    out = []
    normal = normalize_text(text)
    for candidate in dict.fromkeys((normal, strip_wrappers(normal))):
        for t in [*_BY_WORD.get(_first_word(candidate), ()), *_OPEN_SLOT]:
            match = t.regex.fullmatch(candidate)
            if match:
                out.append((t, tuple(match.groupdict().items())))
    return tuple(out)


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
    for template, slots in match_templates(text_of(ctx[-1].get("content"))):
        problem = _HANDLERS[template.key](dict(slots), ctx)
        if problem is not None:
            return problem
    return None


def solve(messages: Conversation) -> str | None:
    """The canonical answer to the conversation's last user turn, from its text alone."""
    problem = parse_problem(messages)
    return None if problem is None else problem.answer
