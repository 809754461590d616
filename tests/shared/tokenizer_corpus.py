"""Texts the tokenizer tests train on and probe with, and their hypothesis settings."""

from __future__ import annotations

import random

from hypothesis import settings

PROPS = settings(max_examples=200, deadline=None)
TRICKY = [
    "",
    " leading space",
    "  two\n\nnewlines\ttab\r\n",
    "\x00nul\x00",
    "<|user|> literal <|end|>",
    "emoji 😀👍🏽 and 👨‍👩‍👧",
    "CJK 漢字かなカナ 한국어",
    "astral \U00010000 \U0010fffd",
    "combining e\u0301 a\u0308\u0323",
    "\x01\x02\x03\x04\x05 controls",
]


def corpus() -> list[str]:
    rng = random.Random(0)
    words = [
        "the",
        "a",
        "model",
        "user",
        "assistant",
        "hello",
        "world",
        "chat",
        "answer",
        "question",
        "token",
        "palm",
        "is",
        "of",
        "to",
    ]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    return lines + TRICKY
