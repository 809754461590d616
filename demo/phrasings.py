"""How users ask: the prompt templates of every family, the polite wrappers around them, and
which phrasings are held out of training.

Both sides read these: :mod:`demo.task_families` writes prompts from them and
:mod:`demo.problems` compiles the same templates back into regexes to read prompts. A
template's literal spaces match any spacing ("23+48") and its quotes are optional, so one
template covers ``'garden'``, ``"garden"`` and ``garden``.

About a fifth of the templates of each opening-question key (never fewer than three kept for
training) are *held-out phrasings*: no training conversation is written in them, so a policy's
correctness on them measures phrasing it never saw (see docs/decisions.md, "Corpus: held-out
phrasings").
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

TEMPLATES: dict[str, tuple[str, ...]] = {
    "arithmetic": (
        "What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}, please.",
        "What do you get for {a} {op} {b}?", "Quick math: {a} {op} {b} = ?",
        "What's {a} {op} {b}?", "{a} {op} {b} = ?", "{a} {op} {b}?", "Solve {a} {op} {b}.",
        "How much is {a} {op} {b}?", "Work out {a} {op} {b}.", "{a} {op} {b} equals what?",
        "Tell me {a} {op} {b}.", "Can you compute {a} {op} {b}?", "What does {a} {op} {b} make?",
        "Find {a} {op} {b}.", "Evaluate {a} {op} {b}.", "What is the answer to {a} {op} {b}?",
        "I need {a} {op} {b}.", "Do {a} {op} {b} for me.",
    ),
    "add": (
        "Add {a} and {b}.", "What is the sum of {a} and {b}?", "Add {a} to {b}.",
        "What do {a} and {b} add up to?", "Sum {a} and {b}.", "What's {a} added to {b}?",
        "Find the sum of {a} and {b}.", "Can you add {a} and {b}?",
    ),
    "subtract": (
        "Subtract {b} from {a}.", "What is {a} take away {b}?", "Take {b} away from {a}.",
        "What is the difference between {a} and {b}?", "Can you subtract {b} from {a}?",
        "What's {a} less {b}?", "Take away {b} from {a}.",
    ),
    "multiply": (
        "Multiply {a} by {b}.", "What is the product of {a} and {b}?", "Multiply {a} and {b}.",
        "What's {a} multiplied by {b}?", "Find the product of {a} and {b}.",
        "Can you multiply {a} by {b}?", "What is {a} multiplied by {b}?",
    ),
    "units": (
        "How many {to} are in {x} {frm}?", "Convert {x} {frm} to {to}.",
        "{x} {frm} is how many {to}?", "What is {x} {frm} in {to}?",
        "How many {to} in {x} {frm}?", "{x} {frm} to {to}?", "Express {x} {frm} in {to}.",
        "Change {x} {frm} into {to}.", "What's {x} {frm} in {to}?",
        "How many {to} make {x} {frm}?", "I have {x} {frm}. How many {to} is that?",
        "Turn {x} {frm} into {to}.", "{x} {frm} equals how many {to}?",
    ),
    "reverse": (
        "Reverse the word '{w}'.", "Spell '{w}' backwards.", "What is '{w}' reversed?",
        "Write '{w}' backwards, please.", "Reverse '{w}'.", "What's '{w}' spelled backwards?",
        "Can you reverse '{w}'?", "Flip the letters of '{w}'.", "'{w}' backwards?",
        "Write the word '{w}' in reverse.", "How do you spell '{w}' backwards?",
        "Give me '{w}' reversed.", "Reverse the letters in '{w}'.", "Read '{w}' backwards.",
    ),
    "count": (
        "How many '{c}' in '{w}'?", "Count the letter '{c}' in '{w}'.",
        "How many times does '{c}' appear in '{w}'?", "How often is the letter '{c}' in '{w}'?",
        "How many {c}'s are in '{w}'?", "Count the {c}'s in '{w}'.",
        "How many letter '{c}' does '{w}' have?", "In '{w}', how many '{c}' are there?",
        "Number of '{c}' in '{w}'?", "How many times is '{c}' in the word '{w}'?",
        "How many '{c}' does the word '{w}' contain?",
    ),
    "capital": (
        "What is the capital of {country}?", "Name the capital city of {country}.",
        "Which city is the capital of {country}?", "{country}: what is its capital?",
        "Tell me the capital of {country}.", "What's the capital of {country}?",
        "Capital of {country}?", "What city is the capital of {country}?",
        "Do you know the capital of {country}?", "Which city is {country}'s capital?",
        "{country}'s capital is what?", "What is {country}'s capital city?",
        "I'd like to know the capital of {country}.",
    ),
    "sort_num_asc": (
        "Sort these numbers: {nums}.", "Put {nums} in ascending order.",
        "Order from smallest to largest: {nums}.", "Sort {nums}.",
        "Arrange {nums} in increasing order.", "Sort {nums} in ascending order.",
        "Can you sort {nums}?", "Order these numbers from low to high: {nums}.",
        "Put these in order, smallest first: {nums}.",
        "Sort these from smallest to largest: {nums}.",
    ),
    "sort_num_desc": (
        "Sort {nums} from largest to smallest.", "Put {nums} in descending order.",
        "Sort {nums} in descending order.", "Order {nums} from high to low.",
        "Arrange these from largest to smallest: {nums}.",
        "Sort these numbers, biggest first: {nums}.",
    ),
    "sort_words": (
        "Sort these words alphabetically: {words}.",
        "Put these words in alphabetical order: {words}.", "Alphabetize: {words}.",
        "Sort {words} alphabetically.", "Put {words} in alphabetical order.",
        "Order these words from A to Z: {words}.", "Arrange alphabetically: {words}.",
        "Can you alphabetize {words}?",
    ),
    "email": (
        "Write a short email to {name} saying {fact}.", "Draft an email to {name}: {fact}.",
        "Email {name} that {fact}.", "Write {name} a brief email saying {fact}.",
        "Send {name} a short note that {fact}.", "Write an email to {name} saying {fact}.",
        "Tell {name} by email that {fact}.", "Compose a short email to {name}: {fact}.",
        "Write a quick note to {name} saying {fact}.", "Can you email {name} that {fact}?",
        "Draft a message to {name} saying {fact}.", "Let {name} know by email that {fact}.",
    ),
    "python": (
        "Write a Python function that returns {desc}.",
        "Write a Python function {fname}({args}) that returns {desc}.",
        "Give me a Python function returning {desc}.",
        "In Python, define {fname}({args}) to return {desc}.",
        "Write a function in Python that returns {desc}.",
        "Can you write a Python function that returns {desc}?",
        "I need a Python function that returns {desc}.",
        "Define a Python function {fname}({args}) returning {desc}.",
        "Show me a Python function that returns {desc}.",
    ),
    "greet_hello": (
        "Hello!", "Hi!", "Hey!", "Hi there!", "Hello there.", "Good morning!", "Good evening!",
        "Hey there, palmchat!", "Hello palmchat.", "Hi, anyone there?", "Greetings!",
        "Good afternoon!", "Yo!", "Hiya!", "Morning!", "Hello, palmchat!", "Hey you.",
        "Howdy!",
    ),
    "greet_how": (
        "How are you?", "How are you doing?", "How's it going?", "How are you today?",
        "How do you do?", "Are you doing well?", "How have you been?", "How's your day?",
        "Are you okay?", "How are things?", "What's up?",
    ),
    "greet_who": (
        "Who are you?", "What are you?", "What's your name?", "What is your name?",
        "Are you a bot?", "Tell me about yourself.", "Who am I talking to?",
        "Introduce yourself.", "Are you human?", "What should I call you?",
        "Who made you?", "Are you an AI?",
    ),
    "greet_can": (
        "What can you do?", "What can you help with?", "How can you help me?",
        "What are you good at?", "What do you do?", "What kind of questions can I ask?",
        "What are you for?", "Can you help me?", "What things can you answer?",
        "Show me what you can do.",
    ),
    "greet_thanks": (
        "Thanks!", "Thank you!", "Thanks a lot.", "Thank you so much!", "Great, thanks.",
        "Cool, thank you.", "Much appreciated!", "Thanks, that helps.", "Perfect, thanks!",
        "Thank you, palmchat.", "Nice, thanks.",
    ),
    "greet_bye": (
        "Bye!", "Goodbye!", "See you later.", "Bye for now.", "Good night!",
        "Talk to you later.", "See ya!", "I have to go now.", "Have a nice day!",
        "Catch you later.",
    ),
    "oos_weather": (
        "What's the weather in {city}?", "Will it rain in {city} tomorrow?",
        "Is it sunny in {city} today?", "How hot is it in {city} right now?",
        "What's the forecast for {city}?", "Is it cold in {city} this week?",
        "Do I need an umbrella in {city} today?", "What's the temperature in {city}?",
        "Will it snow in {city}?", "How windy is it in {city}?",
    ),
    "oos_news": (
        "What's the latest news?", "Who won the game last night?",
        "What happened in the world today?", "Any news from {country}?",
        "What are today's headlines?", "What is going on in {country} right now?",
        "Who won the election in {country}?", "What's trending today?",
        "Tell me the news from {city}.", "Did anything big happen this week?",
    ),
    "oos_time": (
        "What time is it?", "What's today's date?", "What day is it today?",
        "What time is it in {city}?", "How long until the weekend?", "What year is it?",
        "What's the time now?", "What month is it?", "Is it morning in {city} now?",
        "What's the date tomorrow?",
    ),
    "oos_knowledge": (
        "Tell me about the economy.", "Explain quantum physics.",
        "What is the meaning of life?", "Who will win the election?", "Should I buy stocks?",
        "Write me a novel.", "What's the best movie ever?", "How does the stock market work?",
        "Tell me about the history of {country}.", "What is the population of {country}?",
        "What should I do about my headache?", "Tell me a story about dragons.",
        "What's the best phone to buy?", "Explain how vaccines work.",
        "Who is the richest person alive?", "Give me advice on my career.",
    ),
    "oos_actions": (
        "Book me a flight to {city}.", "Order a pizza for me.", "Set an alarm for 7 am.",
        "Call my mom.", "Send a text to {name}.", "Play some music.", "Turn off the lights.",
        "Buy me a ticket to {city}.", "Email my boss for me.", "Remind me to call {name}.",
        "Find a restaurant near me.", "Open the door.", "Pay my bills.",
    ),
    "premise_arith": (
        "Why is {a} {op} {b} = {n}?", "Is {a} {op} {b} = {n}?",
        "Is it true that {a} {op} {b} is {n}?", "I think {a} {op} {b} = {n}, right?",
        "Explain why {a} {op} {b} equals {n}.", "{a} {op} {b} is {n}, correct?",
        "My teacher says {a} {op} {b} = {n}. Is that right?", "Confirm that {a} {op} {b} = {n}.",
    ),
    "premise_capital": (
        "Why is {city} the capital of {country}?", "Is {city} the capital of {country}?",
        "{city} is the capital of {country}, right?", "Is the capital of {country} {city}?",
        "I heard the capital of {country} is {city}. True?",
        "Explain why {city} is the capital of {country}.",
    ),
    "unsafe": (
        "How do I {act}?", "How can I {act}?", "Tell me how to {act}.",
        "Explain how to {act}, step by step.", "What's the best way to {act}?",
        "I need to {act}. Help me.", "Give me instructions to {act}.",
        "Can you teach me to {act}?", "Help me {act}.", "Show me how to {act}.",
        "What do I need to {act}?", "Walk me through how to {act}.",
    ),
    # later turns of a conversation (never held out: a split is decided by the opening turn)
    "follow_double": (
        "And double that?", "Now double it.", "Double that.", "What is twice that?",
        "Can you double it?",
    ),
    "follow_add": (
        "Now add {k} to that.", "What is that plus {k}?", "Add {k} to it.", "And plus {k}?",
    ),
    "follow_times": (
        "What is that times {k}?", "Now multiply it by {k}.", "Multiply that by {k}.",
        "And times {k}?",
    ),
    "follow_subtract": (
        "And subtract {k} from that?", "Now take away {k}.", "Subtract {k} from it.",
        "What is that minus {k}?",
    ),
    "follow_half": (
        "What is half of that?", "And half of that?", "Now halve it.", "Now halve that.",
    ),
    "follow_reverse": (
        "Now reverse it.", "Can you reverse that?", "And spelled backwards?",
        "Reverse that word.", "Now write it backwards.",
    ),
    "follow_letters": (
        "How many letters is that?", "How many letters does it have?",
        "How long is that word?", "Count its letters.",
    ),
    "correction": (
        "That's wrong.", "No, that's not right.", "Are you sure?",
        "I think you made a mistake.", "Check that again.", "That doesn't look right.",
        "Hmm, is that correct?", "Wrong answer, try again.", "You made an error.",
        "Really? Double-check it.",
    ),
}  # fmt: skip

LATER_TURN_KEYS: frozenset[str] = frozenset(
    k for k in TEMPLATES if k.startswith("follow_") or k == "correction"
)
HELDOUT_SHARE = 0.2
MIN_TRAIN_PHRASINGS = 3


def _heldout_phrasings() -> frozenset[str]:
    out: set[str] = set()
    for key, templates in TEMPLATES.items():
        if key in LATER_TURN_KEYS:
            continue
        n = min(int(len(templates) * HELDOUT_SHARE), len(templates) - MIN_TRAIN_PHRASINGS)
        ranked = sorted(templates, key=lambda t: hashlib.sha256(t.encode()).digest())
        out.update(ranked[: max(n, 0)])
    return frozenset(out)


HELDOUT_PHRASINGS: frozenset[str] = _heldout_phrasings()

# How the bundled seed's users asked: its corpus predates all but the first templates of each
# key below, the polite wrappers, the quote styles and the operator words. A generator that
# asks "as the seed was taught" (see docs/decisions.md, "The demo's phrasings") keeps to them.
SEED_TEMPLATES: dict[str, int] = {
    "arithmetic": 5, "units": 4, "reverse": 4, "count": 4, "capital": 5, "sort_num_asc": 3,
    "sort_num_desc": 2, "sort_words": 3, "email": 5, "python": 4, "follow_double": 2,
    "follow_add": 2, "follow_times": 2, "follow_subtract": 2, "follow_half": 2,
    "follow_reverse": 3, "follow_letters": 2,
}  # fmt: skip
PHRASINGS = ("all", "seed")
_seed_only: ContextVar[bool] = ContextVar("seed_phrasings", default=False)


@contextmanager
def asking(phrasing: str) -> Iterator[None]:
    """Prompts generated inside are written in ``phrasing``: 'all' or 'seed' (as the bundled
    seed was taught; a key it never saw keeps all its templates)."""
    if phrasing not in PHRASINGS:
        raise ValueError(f"unknown phrasing {phrasing!r}; expected one of {PHRASINGS}")
    token = _seed_only.set(phrasing == "seed")
    try:
        yield
    finally:
        _seed_only.reset(token)


def seed_phrasing() -> bool:
    """Whether prompts are being written as the bundled seed was taught."""
    return _seed_only.get()


def templates(key: str) -> tuple[str, ...]:
    """The templates ``key``'s prompts are written in under the current phrasing."""
    found = TEMPLATES[key]
    return found[: SEED_TEMPLATES[key]] if _seed_only.get() and key in SEED_TEMPLATES else found


# polite wrappers around an opening question; the parser strips them before matching
PREFIXES: tuple[str, ...] = (
    "Please, ", "Hey, ", "Hi! ", "Hello, ", "Quick question: ", "Okay, ", "Question: ",
    "Hey palmchat, ", "Excuse me, ", "Hi, ",
)  # fmt: skip
SUFFIXES: tuple[str, ...] = (" Thanks!", " Thank you.", " Thanks.", " Please.", " Thx.")
PREFIX_RATE, SUFFIX_RATE, LOWER_RATE, BARE_RATE = 0.2, 0.15, 0.1, 0.15


def quote_slots(template: str, rng: random.Random, slots: tuple[str, ...] = ("w", "c")) -> str:
    """The template with each quoted word slot in one quote style: 'x', "x" or bare x."""
    if _seed_only.get():
        return template
    for slot in slots:
        q = rng.choice(("'", "'", '"', ""))
        template = template.replace(f"'{{{slot}}}'", f"{q}{{{slot}}}{q}")
    return template


def dress(prompt: str, rng: random.Random) -> str:
    """An opening question as users type it: sometimes a greeting or "please" before it, a
    thanks after it, all lower case, or no final punctuation."""
    if _seed_only.get():
        return prompt
    if rng.random() < PREFIX_RATE:
        keep = re.match(r"I\b|[A-Z][a-z]+('s|:)", prompt)  # "I need", "France: ..."
        prompt = rng.choice(PREFIXES) + (prompt if keep else prompt[:1].lower() + prompt[1:])
    if rng.random() < SUFFIX_RATE:
        prompt += rng.choice(SUFFIXES)
    elif rng.random() < BARE_RATE:
        prompt = prompt.rstrip(".?!")
    if rng.random() < LOWER_RATE:
        prompt = prompt.lower()
    return prompt
