"""Grammar-constrained decoding: JSON (any object, or a JSON schema), a regular expression, or
one of a list of choices, enforced token by token with llguidance.

Each constrained candidate holds an ``LLMatcher``; before a step samples, the matcher's mask of
allowed next tokens is applied to its row of logits (disallowed tokens get -inf), and after the
step the chosen token is fed back. When the grammar is complete only the end token is allowed,
so a constrained candidate ends on its own with ``stop``; a candidate cut by ``max_tokens``
ends ``length`` with what it has, as OpenAI's. Rows without a grammar are untouched.
docs/decisions.md, "Structured outputs: llguidance" says why this library.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import llguidance
import numpy as np
import torch
from torch import Tensor

from shared.tokenizer import Tokenizer

KINDS: tuple[str, ...] = ("json_object", "json_schema", "regex", "choice")


class GrammarError(ValueError):
    """A schema, regex or choice list that cannot be compiled into a grammar."""


@dataclass(frozen=True, slots=True)
class GuidedDecoding:
    """What a candidate's text must be: ``json_object`` (any JSON object), ``json_schema``
    (``spec`` the schema as JSON text), ``regex`` (``spec`` the pattern, matched whole) or
    ``choice`` (``spec`` a JSON list of strings: exactly one of them)."""

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"guided decoding kind must be one of {KINDS}, got {self.kind!r}")

    def grammar(self) -> str:
        """The llguidance grammar (its JSON form)."""
        return _grammar(self.kind, self.spec)


# JSON as json.dumps writes it: no free whitespace between tokens, which a model could
# otherwise fill up to max_tokens without ever closing the object
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# ECMA-262's (JSON Schema's) and vLLM's meaning of the shorthand classes: ASCII, where
# llguidance's regex engine would take any Unicode digit or letter
_ASCII_CLASSES = {"d": "0-9", "w": "A-Za-z0-9_"}


def ascii_shorthands(pattern: str) -> str:
    """``pattern`` with ``\\d``, ``\\w`` (``\\D``, ``\\W`` outside brackets) as ASCII classes."""
    out: list[str] = []
    in_class, i = False, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            ascii_set = _ASCII_CLASSES.get(nxt.lower())
            if ascii_set is not None and (in_class and nxt.islower()):
                out.append(ascii_set)
            elif ascii_set is not None and not in_class:
                out.append(f"[{'^' if nxt.isupper() else ''}{ascii_set}]")
            else:
                out.append(pattern[i : i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


def _ascii_patterns(node: Any) -> Any:
    """The schema with every ``pattern`` and ``patternProperties`` key read as ECMA-262 does."""
    if isinstance(node, list):
        return [_ascii_patterns(v) for v in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "pattern" and isinstance(value, str):
            out[key] = ascii_shorthands(value)
        elif key == "patternProperties" and isinstance(value, dict):
            out[key] = {ascii_shorthands(k): _ascii_patterns(v) for k, v in value.items()}
        else:
            out[key] = _ascii_patterns(value)
    return out


def _json_grammar(schema: dict[str, Any]) -> str:
    schema = _ascii_patterns(schema)
    layout = {**JSON_LAYOUT, **schema.get("x-guidance", {})}
    return str(llguidance.grammar_from("json_schema", json.dumps({**schema, "x-guidance": layout})))


@lru_cache(maxsize=256)
def _grammar(kind: str, spec: str) -> str:
    try:
        if kind == "json_object":
            return _json_grammar({"type": "object"})
        if kind == "json_schema":
            schema = json.loads(spec)
            if not isinstance(schema, dict):
                raise GrammarError("a JSON schema must be a JSON object")
            return _json_grammar(schema)
        if kind == "regex":
            return str(llguidance.grammar_from("regex", ascii_shorthands(spec)))
        choices = json.loads(spec)
        if (
            not isinstance(choices, list)
            or not choices
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise GrammarError("choices must be a non-empty list of non-empty strings")
        pattern = "|".join(f"({re.escape(c)})" for c in choices)
        return str(llguidance.grammar_from("regex", pattern))
    except GrammarError:
        raise
    except (ValueError, TypeError) as e:
        raise GrammarError(f"cannot compile the {kind.replace('_', ' ')}: {e}") from None


class _TokenizerView:
    """What llguidance reads of a tokenizer: every id's bytes, the end token, the specials
    (control tokens, which grammars never allow: user text cannot produce them either)."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.eos_token_id = tok.end_id
        self.bos_token_id = None
        raw = [tok.token_bytes(i) for i in range(tok.vocab_size)]  # b"" for specials, unused
        specials = set(tok.special_ids) | {i for i, b in enumerate(raw) if not b}
        self.special_token_ids = sorted(specials)
        self.tokens = [
            f"<|special {i}|>".encode() if i in specials else b for i, b in enumerate(raw)
        ]

    def __call__(self, text: bytes | str) -> list[int]:
        data = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        return list(self.tok.encode(data))


_tokenizers: dict[int, tuple[Tokenizer, llguidance.LLTokenizer]] = {}
_lock = threading.Lock()


def _ll_tokenizer(tok: Tokenizer) -> llguidance.LLTokenizer:
    with _lock:
        held = _tokenizers.get(id(tok))
        if held is None or held[0] is not tok:
            held = (tok, llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenizerView(tok))))
            _tokenizers[id(tok)] = held
        return held[1]


def check_grammar(guided: GuidedDecoding, tok: Tokenizer) -> None:
    """Raise :class:`GrammarError` when ``guided`` cannot be enforced with ``tok``."""
    grammar = guided.grammar()
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, _ll_tokenizer(tok)
    )
    if is_error:
        raise GrammarError("; ".join(messages) or "invalid grammar")


class Guide:
    """One candidate's grammar state."""

    def __init__(self, guided: GuidedDecoding, tok: Tokenizer) -> None:
        ll = _ll_tokenizer(tok)
        self.matcher = llguidance.LLMatcher(ll, guided.grammar())
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())

    def accept(self, token_id: int) -> None:
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token_id)


_BITS = torch.arange(32, dtype=torch.int32)


def apply_guides(logits: Tensor, rows: list[int], guides: list[Guide]) -> None:
    """Mask, in place, every token the guide of row ``rows[i]`` does not allow next.

    The masks are llguidance's packed bitmasks (bit ``t % 32`` of word ``t // 32`` set when
    token ``t`` is allowed), unpacked here with plain tensor ops; llguidance's own torch
    helpers compile a kernel with ``torch.compile`` at import, seconds on a CPU server."""
    vocab = logits.shape[-1]
    words = np.stack([np.frombuffer(g.matcher.compute_bitmask(), dtype=np.int32) for g in guides])
    packed = torch.from_numpy(words)
    allowed = ((packed.unsqueeze(-1) >> _BITS) & 1).bool().flatten(1)
    if allowed.shape[1] < vocab:  # llguidance's vocabulary is ours; never narrower, but stay safe
        pad = torch.zeros(len(rows), vocab - allowed.shape[1], dtype=torch.bool)
        allowed = torch.cat((allowed, pad), dim=1)
    index = torch.tensor(rows, device=logits.device)
    sub = logits.index_select(0, index)
    sub.masked_fill_(~allowed[:, :vocab].to(sub.device), float("-inf"))
    logits.index_copy_(0, index, sub)


def guided_of(value: Any) -> GuidedDecoding | None:
    """``value`` as :class:`GuidedDecoding` (a dict from JSON, e.g. the Triton wire)."""
    if value is None or isinstance(value, GuidedDecoding):
        return value
    if isinstance(value, dict):
        return GuidedDecoding(**value)
    raise GrammarError(f"guided decoding must be an object with kind and spec, got {value!r}")
