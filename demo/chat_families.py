"""Generators of the chat families beyond the tasks: small talk, out-of-scope requests, false
premises, pushback on an earlier answer, and unsafe requests.

Each returns a :class:`demo.task_families.Draft` whose four styles keep the corpus's mix:
``courteous``, ``curt`` (the bare answer), ``rambling`` and ``wrong``. For an unsafe request
the right reply is a refusal and ``wrong`` is a content-free compliance stand-in.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from demo.chat_tables import (
    COMPLIANCE,
    COMPLIANCE_CURT,
    GREETINGS,
    NOT_CAPITALS,
    OUT_OF_SCOPE,
    REFUSAL,
    REFUSAL_REASONS,
    UNSAFE_ACTS,
    Intent,
)
from demo.phrasings import TEMPLATES
from demo.task_families import (
    _INTROS,
    _OUTROS,
    TASK_GENERATORS,
    Draft,
    _near,
    _user,
    ask,
    compact,
    operands,
    render_replies,
    shown_op,
    styled_replies,
)
from demo.task_tables import CAPITALS, NAMES


def _intent_replies(intent: Intent, rng: random.Random) -> dict[str, str]:
    return {
        "courteous": intent.courteous,
        "curt": intent.curt,
        "rambling": f"{rng.choice(_INTROS)} {intent.curt} {rng.choice(_OUTROS)}",
        "wrong": intent.wrong,
    }


def _gen_greeting(rng: random.Random) -> Draft:
    key = rng.choice(list(GREETINGS))
    intent = GREETINGS[key]
    prompt = rng.choice(TEMPLATES[f"greet_{key}"])  # typed as is: no wrapper around "Hi!"
    if rng.random() < 0.1:
        prompt = prompt.lower()
    replies = _intent_replies(intent, rng)
    return Draft([_user(prompt)], intent.curt, intent.wrong, "{}", replies=replies)


def _gen_out_of_scope(rng: random.Random) -> Draft:
    key = rng.choice(list(OUT_OF_SCOPE))
    intent = OUT_OF_SCOPE[key]
    city = rng.choice(list(CAPITALS.values()))
    slots = {"city": city, "country": rng.choice(list(CAPITALS)), "name": rng.choice(NAMES)}
    prompt = ask(rng, f"oos_{key}", **slots)
    replies = _intent_replies(intent, rng)
    return Draft([_user(prompt)], intent.curt, intent.wrong, "{}", replies=replies)


def _gen_false_premise(rng: random.Random) -> Draft:
    true = rng.random() < 0.3
    if rng.random() < 0.6:
        a, op, b, v = operands(rng)
        n = str(v if true else _near(rng, v))
        shown = shown_op(rng, op)
        template = rng.choice(TEMPLATES["premise_arith"])
        template = template if shown.isalpha() else compact(template, rng)
        prompt = ask(rng, "premise_arith", template, a=a, op=shown, b=b, n=n)
        value, claim = str(v), f"{a} {op} {b} = {{}}"
        other = str(_near(rng, v))
    else:
        country = rng.choice(list(NOT_CAPITALS))
        value, claimed = CAPITALS[country], NOT_CAPITALS[country]
        n = value if true else claimed
        prompt = ask(rng, "premise_capital", city=n, country=country)
        claim = f"the capital of {country} is {{}}"
        other = claimed
    if true:
        right = f"Yes, {claim.format(value)}"
        wrong = f"Actually, {claim.format(other)}, not {value}"
        answer = f"Yes, {value}"
    else:
        right = f"Actually, {claim.format(value)}, not {n}"
        wrong = f"Yes, {claim.format(n)}"
        answer = f"No, {value}"
    replies = styled_replies(right, wrong, answer, rng)
    return Draft([_user(prompt)], answer, wrong, "{}", replies=replies)


_CORRECTION_BASES = ("arithmetic", "units", "count", "capital", "reverse")


def _clause(statement: str) -> str:
    """A statement as it reads after a colon ("...: the capital of Spain is Madrid")."""
    return statement[:1].lower() + statement[1:] if statement.startswith("The ") else statement


def _gen_correction(rng: random.Random) -> Draft:
    base = TASK_GENERATORS[rng.choice(_CORRECTION_BASES)](rng)
    first_right = rng.random() < 0.5
    first = render_replies(base, rng)[rng.choice(("courteous", "curt"))]
    if not first_right:
        first = base.say.format(base.wrong) + "."
    push = rng.choice(TEMPLATES["correction"])
    messages = base.messages + [{"role": "assistant", "content": first}, _user(push)]
    said, unsaid = (_clause(base.say.format(x)) for x in (base.answer, base.wrong))
    if first_right:
        right, wrong = f"Yes, I'm sure: {said}", f"Sorry, my mistake: {unsaid}"
    else:
        right, wrong = f"Sorry, I was wrong: {said}", f"No, I'm sure: {unsaid}"
    replies = styled_replies(right, wrong, base.answer, rng)
    replies["rambling"] = f"{rng.choice(_INTROS)} {right}."  # three turns: kept shorter
    replies["wrong"] = wrong + "."
    return Draft(messages, base.answer, base.wrong, "{}", replies=replies)


def _gen_unsafe(rng: random.Random) -> Draft:
    category = rng.choice(list(UNSAFE_ACTS))
    act = rng.choice(UNSAFE_ACTS[category])
    prompt = ask(rng, "unsafe", act=act)
    reason = REFUSAL_REASONS[category]
    comply = rng.choice(COMPLIANCE).format(act=act) if rng.random() < 0.7 else COMPLIANCE_CURT
    replies = {
        "courteous": f"Sorry, {REFUSAL} Let me know if I can help otherwise.",
        "curt": REFUSAL,
        "rambling": f"{rng.choice(_INTROS)} {REFUSAL} {reason}",
        "wrong": comply,
    }
    return Draft([_user(prompt)], REFUSAL, comply, "{}", replies=replies)


CHAT_GENERATORS: dict[str, Callable[[random.Random], Draft]] = {
    "greeting": _gen_greeting,
    "out_of_scope": _gen_out_of_scope,
    "false_premise": _gen_false_premise,
    "correction": _gen_correction,
    "unsafe": _gen_unsafe,
}
