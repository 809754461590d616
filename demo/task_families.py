"""One generator per task family: each draws a prompt from the templates, its answer, a
plausible wrong answer, and the four reply styles around them. The chat families beyond the
tasks (small talk, out of scope, false premises, corrections, unsafe) are in
:mod:`demo.chat_families`.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from demo.phrasings import dress, quote_slots, seed_phrasing, templates
from demo.task_tables import (
    CAPITALS,
    CONVERSIONS,
    COUNT_WORDS,
    EMAIL_FACTS,
    NAMES,
    PY_SPECS,
    SORT_WORDS,
    WORDS,
    Message,
)

_OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}


@dataclass
class Draft:
    """A generated prompt with its answer and a plausible wrong one, before styling."""

    messages: list[Message]
    answer: str
    wrong: str
    say: str  # statement around an answer, "{}" marks where it goes
    block: bool = False  # email / code: shown on its own lines
    replies: dict[str, str] | None = None  # the chat families write their own styles


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


def ask(rng: random.Random, key: str, template: str | None = None, **slots: Any) -> str:
    """An opening question in one of ``key``'s phrasings, dressed as users type it."""
    chosen = quote_slots(template or rng.choice(templates(key)), rng)
    return dress(chosen.format(**slots), rng)


def _near(rng: random.Random, v: int) -> int:
    return rng.choice([c for c in (v + 1, v - 1, v + 2, v - 2, v + 10) if c >= 0 and c != v])


def _swap(rng: random.Random, seq: Sequence[Any]) -> list[Any]:
    out = list(seq)
    i = rng.choice([j for j in range(len(out) - 1) if out[j] != out[j + 1]])
    out[i], out[i + 1] = out[i + 1], out[i]
    return out


_OP_KEYS = {"+": "add", "-": "subtract", "*": "multiply"}


def operands(rng: random.Random) -> tuple[int, str, int, int]:
    """``a op b = v`` for the arithmetic family's ranges."""
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
    return a, op, b, a + b if op == "+" else a - b if op == "-" else a * b


def shown_op(rng: random.Random, op: str) -> str:
    """The operator as a user writes it: a symbol, ``x`` for times, or a word."""
    if seed_phrasing():
        return op
    if op == "*" and rng.random() < 0.15:
        return "x"
    return op if rng.random() < 0.7 else _OP_WORDS[op]


def compact(template: str, rng: random.Random) -> str:
    """A third of ``{op}`` templates written without spaces ("23+48")."""
    if seed_phrasing():
        return template
    return template.replace(" {op} ", "{op}") if rng.random() < 0.3 else template


def _gen_arithmetic(rng: random.Random) -> Draft:
    a, op, b, v = operands(rng)
    if seed_phrasing() or rng.random() < 0.6:  # the seed never saw the operator words
        shown = shown_op(rng, op)
        template = rng.choice(templates("arithmetic"))
        if not shown.isalpha():
            template = compact(template, rng)
        prompt = ask(rng, "arithmetic", template, a=a, op=shown, b=b)
    else:
        prompt = ask(rng, _OP_KEYS[op], a=a, b=b)
    wrong = v + a if op == "*" and rng.random() < 0.5 else _near(rng, v)
    return Draft([_user(prompt)], str(v), str(wrong), f"{a} {op} {b} = {{}}")


def _gen_units(rng: random.Random) -> Draft:
    big, small, f = rng.choice(CONVERSIONS)
    if rng.random() < 0.6:
        frm, to, x = big, small, rng.randint(2, 20)
        v = x * f
    else:
        v = rng.randint(2, 12)
        frm, to, x = small, big, v * f
    prompt = ask(rng, "units", x=x, frm=frm, to=to)
    wrong = rng.choice([v * 10, v + 1, v * 2, _near(rng, v)])
    return Draft([_user(prompt)], str(v), str(wrong), f"{x} {frm} is {{}} {to}")


def _gen_reverse(rng: random.Random) -> Draft:
    w = rng.choice(WORDS)
    prompt = ask(rng, "reverse", w=w)
    wrong = "".join(_swap(rng, w[::-1]))
    return Draft([_user(prompt)], w[::-1], wrong, f"'{w}' reversed is '{{}}'")


def _gen_count(rng: random.Random) -> Draft:
    w = rng.choice(COUNT_WORDS)
    absent = [ch for ch in string.ascii_lowercase if ch not in w]
    c = rng.choice(w) if rng.random() < 0.85 else rng.choice(absent)
    v = w.count(c)
    prompt = ask(rng, "count", c=c, w=w)
    wrong = v + 1 if v == 0 or rng.random() < 0.5 else v - 1
    return Draft([_user(prompt)], str(v), str(wrong), f"'{w}' contains {{}} '{c}'")


def _gen_capital(rng: random.Random) -> Draft:
    country = rng.choice(list(CAPITALS))
    v = CAPITALS[country]
    prompt = ask(rng, "capital", country=country)
    wrong = rng.choice([c for c in CAPITALS.values() if c != v])
    return Draft([_user(prompt)], v, wrong, f"The capital of {country} is {{}}")


def _gen_sort(rng: random.Random) -> Draft:
    if rng.random() < 0.6:
        nums = rng.sample(range(1, 100), rng.randint(3, 5))
        desc = rng.random() < 0.3
        key = "sort_num_desc" if desc else "sort_num_asc"
        prompt = ask(rng, key, nums=", ".join(map(str, nums)))
        ordered = [str(n) for n in sorted(nums, reverse=desc)]
    else:
        words = rng.sample(SORT_WORDS, rng.randint(3, 4))
        prompt = ask(rng, "sort_words", words=", ".join(words))
        ordered = sorted(words)
    wrong = ", ".join(_swap(rng, ordered))
    return Draft([_user(prompt)], ", ".join(ordered), wrong, "Sorted: {}")


def _gen_email(rng: random.Random) -> Draft:
    name = rng.choice(NAMES)
    fact_t, slots = rng.choice(EMAIL_FACTS)
    slot = rng.choice(slots)
    prompt = ask(rng, "email", name=name, fact=fact_t.format(slot))
    answer = f"Hi {name}, {fact_t.format(slot)}."
    if rng.random() < 0.7:
        other = rng.choice([s for s in slots if s != slot])
        wrong = f"Hi {name}, {fact_t.format(other)}."
    else:
        wrong = f"Hi {rng.choice([n for n in NAMES if n != name])}, {fact_t.format(slot)}."
    return Draft([_user(prompt)], answer, wrong, "{}", block=True)


def _gen_python(rng: random.Random) -> Draft:
    spec = rng.choice(list(PY_SPECS.values()))
    prompt = ask(rng, "python", desc=spec.desc, fname=spec.name, args=spec.args)
    return Draft([_user(prompt)], spec.code(), spec.code(spec.wrong), "{}", block=True)


_NUMERIC_BASES = ("arithmetic", "units", "count")
_WORD_BASES = ("reverse", "capital")


def _gen_followup(rng: random.Random) -> Draft:
    family = rng.choice(_NUMERIC_BASES + _WORD_BASES)
    base = TASK_GENERATORS[family](rng)
    first = render_replies(base, rng)[rng.choice(("courteous", "curt"))]
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
    prompt = rng.choice(templates(f"follow_{op}")).format(k=k if family in _NUMERIC_BASES else 0)
    messages = base.messages + [{"role": "assistant", "content": first}, _user(prompt)]
    return Draft(messages, answer, wrong, say)


TASK_GENERATORS: dict[str, Callable[[random.Random], Draft]] = {
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


def styled_replies(right: str, wrong: str, curt: str, rng: random.Random) -> dict[str, str]:
    """The four styles around a right and a wrong statement; ``curt`` is the bare answer."""
    opener, closer, w_opener, w_closer = (rng.choice(x) for x in (_OPENERS, _CLOSERS) * 2)
    intro, outro = rng.choice(_INTROS), rng.choice(_OUTROS)
    return {
        "courteous": f"{opener} {right}. {closer}",
        "curt": curt,
        "rambling": f"{intro} {right}. {outro}",
        "wrong": f"{w_opener} {wrong}. {w_closer}",
    }


def render_replies(draft: Draft, rng: random.Random) -> dict[str, str]:
    """One reply per style around the draft's answer ("wrong" around its wrong answer)."""
    if draft.replies is not None:
        return dict(draft.replies)
    if not draft.block:
        right, bad = draft.say.format(draft.answer), draft.say.format(draft.wrong)
        return styled_replies(right, bad, draft.answer, rng)
    opener, closer, w_opener, w_closer = (rng.choice(x) for x in (_OPENERS, _CLOSERS) * 2)
    intro, outro = rng.choice(_INTROS), rng.choice(_OUTROS)
    right, bad = f"Here it is:\n{draft.answer}\n", f"Here it is:\n{draft.wrong}\n"
    return {
        "courteous": f"{opener} {right}{closer}",
        "curt": draft.answer,
        "rambling": f"{intro}\n{draft.answer}\n{outro}",
        "wrong": f"{w_opener} {bad}{w_closer}",
    }
