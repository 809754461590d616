"""Reading conversations back: parsing prompts, checking replies, and a scripted rater.

Everything here works from conversation text alone, never from a :class:`demo.tasks.Task`,
so it scores logged production conversations exactly like generated ones. The prompt templates
and tables come from :mod:`demo.task_tables`; each is compiled to a regex and matched against the
last user turn (:func:`parse_problem`, :func:`solve`).
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from typing import Any

from demo.task_tables import CAPITALS, CONVERSIONS, PY_SPECS, TEMPLATES, Conversation, PySpec

# --------------------------------------------------------------------------- parsing

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


# --------------------------------------------------------------------------- parsing


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
            handlers[key] = lambda g, c, op=op: _p_follow(g, c, op)
    return [(_compile(t), handlers[key]) for key, ts in TEMPLATES.items() for t in ts]


_PARSERS = _parsers()


def _content(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


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
    text = normalize_text(_content(ctx[-1]))
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


# --------------------------------------------------------------------------- checking

_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?!\w)")
_STOPWORDS = frozenset(
    ["the", "a", "an", "is", "are", "was", "be", "to", "of", "on", "in", "at", "and", "that"]
    + ["for", "it", "its", "by"]
)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def numbers_in(text: str) -> list[Fraction]:
    """Whole number tokens (optionally negative or decimal) in order of appearance."""
    return [Fraction(t) for t in _NUMBER_RE.findall(text)]


def _phrase(phrase: str) -> re.Pattern[str]:
    body = r"\s+".join(re.escape(p) for p in phrase.split())
    return re.compile(rf"(?<![a-z0-9]){body}(?![a-z0-9])", re.IGNORECASE)


def _check_number(problem: Problem, context: Conversation, reply: str) -> bool:
    """Numbers the reply adds beyond those already in the conversation must all be the answer.

    If it adds none (e.g. the answer was an operand), its last number must be the answer.
    """
    target, said = Fraction(problem.answer), numbers_in(reply)
    if not said:
        return False
    seen = Counter(n for m in context for n in numbers_in(_text(m.get("content"))))
    new = Counter(said) - seen
    return set(new) == {target} if new else said[-1] == target


def _check_sequence(problem: Problem, reply: str) -> bool:
    """The last ``k`` item tokens in the reply are the items in the right order."""
    if problem.numeric:
        tokens = [format_number(n) for n in numbers_in(reply)]
    else:
        allowed = set(problem.items)
        tokens = [t for t in re.findall(r"[a-z]+", reply.lower()) if t in allowed]
    k = len(problem.items)
    return len(tokens) >= k and tuple(tokens[-k:]) == problem.items


def _check_email(problem: Problem, reply: str) -> bool:
    """Mentions the recipient and every content word of the key fact."""
    words = [w for w in re.findall(r"[a-z0-9]+", problem.fact.lower()) if w not in _STOPWORDS]
    return all(_phrase(w).search(reply) for w in [problem.name, *words])


def check_reply(problem: Problem, messages: Conversation, reply: str) -> bool:
    """Whether ``reply`` answers ``problem`` (family-aware)."""
    reply = _text(reply)
    if problem.kind == "number":
        idx = last_user_index(messages)
        return _check_number(problem, messages[: (idx or 0) + 1], reply)
    if problem.kind == "word":
        return _phrase(problem.answer).search(reply) is not None
    if problem.kind == "sequence":
        return _check_sequence(problem, reply)
    if problem.kind == "email":
        return _check_email(problem, reply)
    if problem.kind == "python":
        return check_python(reply, problem.func)
    raise ValueError(f"unknown problem kind {problem.kind!r}")


def is_correct(messages: Conversation, reply: str) -> bool | None:
    """Whether the reply contains the correct answer; None if the prompt is unrecognised."""
    problem = parse_problem(messages)
    return None if problem is None else check_reply(problem, messages, reply)


# --------------------------------------------------------------------------- python sandbox

SAFE_BUILTINS: dict[str, Callable[..., Any]] = {
    "abs": abs, "max": max, "min": min, "len": len,
    "str": str, "int": int, "bool": bool, "round": round,
}  # fmt: skip
_ALLOWED_NODES = (
    ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.Call, ast.Name, ast.Load,
    ast.Constant, ast.Subscript, ast.Slice, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv,
    ast.Mod, ast.Pow, ast.USub, ast.UAdd, ast.Not, ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt,
    ast.LtE, ast.Gt, ast.GtE,
)  # fmt: skip
PY_INPUTS: dict[str, tuple[tuple[Any, ...], ...]] = {
    "x": ((0,), (1,), (2,), (3,), (7,), (-4,), (10,)),
    "a, b": ((1, 2), (5, 3), (-2, 7), (4, 4), (0, 9)),
    "s": (("hello",), ("abc",), ("x",), ("python",), ("noon",)),
}
_DEF_RE = re.compile(r"\bdef\s+[A-Za-z_]\w*\s*\(")


def extract_function(reply: str) -> str | None:
    """Source of the first ``def`` in the reply: its line plus the indented lines after it."""
    lines = _text(reply).replace("\r\n", "\n").split("\n")
    for i, line in enumerate(lines):
        match = _DEF_RE.search(line)
        if match is None:
            continue
        block = [line[match.start() :]]
        for nxt in lines[i + 1 :]:
            if nxt.strip() and not nxt[:1].isspace():
                break
            block.append(nxt)
        return "\n".join(block).rstrip()
    return None


def _safe_expr(expr: ast.expr, params: set[str]) -> bool:
    """A pure, small, loop-free expression over the parameters and a few builtins."""
    nodes = list(ast.walk(expr))
    if len(nodes) > 80:
        return False
    mults = pows = 0
    for node in nodes:
        if not isinstance(node, _ALLOWED_NODES):
            return False
        if isinstance(node, ast.Name) and node.id not in params | SAFE_BUILTINS.keys():
            return False
        if isinstance(node, ast.Call) and (
            not isinstance(node.func, ast.Name)
            or node.func.id not in SAFE_BUILTINS
            or node.keywords
            or len(node.args) > 3
        ):
            return False
        if isinstance(node, ast.Constant):
            v = node.value
            if v is not None and not isinstance(v, bool | int | float | str):
                return False
            if isinstance(v, int | float) and abs(v) > 100 or isinstance(v, str) and len(v) > 20:
                return False
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            mults += 1
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            pows += 1
            e = node.right
            if not (isinstance(e, ast.Constant) and type(e.value) is int and 0 <= e.value <= 4):
                return False
    return mults <= 3 and pows <= 1


def compile_function(code: str, arity: int) -> Callable[..., Any] | None:
    """Compile ``def f(args): return <expr>`` in a restricted namespace (None if not allowed).

    Only one ``return`` of a vetted expression is accepted (no imports, loops, attributes or
    calls beyond :data:`SAFE_BUILTINS`), so evaluation always terminates quickly.
    """
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    fdef = next((n for n in tree.body if isinstance(n, ast.FunctionDef)), None)
    if fdef is None or fdef.decorator_list or fdef.returns or fdef.name.startswith("__"):
        return None
    a = fdef.args
    if a.posonlyargs or a.vararg or a.kwonlyargs or a.kwarg or a.defaults:
        return None
    if len(a.args) != arity or any(arg.annotation for arg in a.args):
        return None
    body = fdef.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # docstring
    if len(body) != 1 or not isinstance(body[0], ast.Return) or body[0].value is None:
        return None
    if not _safe_expr(body[0].value, {arg.arg for arg in a.args}):
        return None
    fdef.body = body
    namespace: dict[str, Any] = {"__builtins__": dict(SAFE_BUILTINS)}
    try:
        exec(compile(ast.Module(body=[fdef], type_ignores=[]), "<reply>", "exec"), namespace)
    except Exception:
        return None
    fn = namespace.get(fdef.name)
    return fn if callable(fn) else None


@cache
def _reference(func: str) -> Callable[..., Any]:
    spec = PY_SPECS[func]
    fn = compile_function(spec.code(), len(spec.args.split(",")))
    assert fn is not None, spec
    return fn


def check_python(reply: str, func: str) -> bool:
    """Whether the first function in ``reply`` behaves like ``PY_SPECS[func]`` on test inputs."""
    spec = PY_SPECS.get(func)
    code = extract_function(reply)
    if spec is None or code is None:
        return False
    fn = compile_function(code, len(spec.args.split(",")))
    if fn is None:
        return False
    ref = _reference(func)
    for args in PY_INPUTS[spec.args]:
        try:
            if not bool(fn(*args) == ref(*args)):
                return False
        except Exception:
            return False
    return True


# --------------------------------------------------------------------------- rater

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
        reply = _text(reply)
        correct = check_reply(problem, messages, reply)
        extra = max(0, len(reply.strip()) - len(problem.answer))
        score = self._score(correct, extra, politeness(reply))
        if self.noise:
            score += self._jitter(messages, reply)
        return round(_clip(score, -1.0, 1.0), 6)

    def thumb(self, messages: Conversation, reply: str) -> int:
        """+1 (thumbs up) if the score reaches ``threshold``, else -1."""
        return 1 if self.rate(messages, reply) >= self.threshold else -1

    def rank(self, messages: Conversation, replies: Sequence[str]) -> list[int]:
        """Indices of ``replies`` from best to worst (ties keep their order)."""
        scores = [self.rate(messages, r) for r in replies]
        return sorted(range(len(replies)), key=lambda i: (-scores[i], i))


DEFAULT_RATER = ScriptedRater()


def rate(conversation: Sequence[Mapping[str, Any]], reply: str) -> float:
    """Score with the default (courteous-preferring) rater."""
    return DEFAULT_RATER.rate(conversation, reply)
