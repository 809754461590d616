"""Tokenizers and their chat templates.

Every tokenizer renders chats itself (:meth:`Tokenizer.chat_ids`, which
:func:`apply_chat_template` calls): palmchat's own two with palmchat's template, an imported
Hugging Face one (``shared/hf_tokenizer.py``) with its checkpoint's Jinja template. palmchat's
two are byte-level and share the five control tokens (:class:`NativeTokenizer`):

* :class:`BPETokenizer` - byte-level BPE trained with HF ``tokenizers``. The five control
  tokens have the fixed ids 0..4 and BPE ids follow at 5.. . They are *not* added tokens of
  the HF model, so no text can ever encode to them (role markers cannot be injected).
  New ones pre-tokenize every digit alone (``splits_digits``); older files load unchanged.
* :class:`ByteTokenizer` - ids 0..255 are raw UTF-8 bytes (lucidrains PaLM-rlhf-pytorch).

Both save to one ``tokenizer.json``: a small wrapper object
``{"format": "palmchat-tokenizer", "version": 1, "kind": ..., "special_tokens": {...}, ...}``;
the BPE kind embeds the full HF ``tokenizers`` JSON under ``"hf_tokenizer"``.
"""

from __future__ import annotations

import codecs
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

PAD, SYSTEM, USER, ASSISTANT, END = (
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)
SPECIAL_TOKENS: tuple[str, ...] = (PAD, SYSTEM, USER, ASSISTANT, END)
ROLES: tuple[str, ...] = ("system", "user", "assistant")
FILE_NAME = "tokenizer.json"
_FORMAT = "palmchat-tokenizer"
_SURROGATES = re.compile("[\ud800-\udfff]")


class TokenizerError(ValueError):
    """A tokenizer file is missing, corrupt or inconsistent."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable char map used by HF's ByteLevel pre-tokenizer."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_BYTE_OF_CHAR: dict[str, int] = {c: b for b, c in _bytes_to_unicode().items()}


class Tokenizer(ABC):
    """Common interface. Subclasses set the ids in ``__init__`` and implement the hooks.

    ``special_ids`` decode to nothing and no text encodes to them; ``end_id`` closes a turn
    (what a trained response ends with), and :attr:`stop_ids` end a generation."""

    kind: ClassVar[str]
    chat_template_kind: ClassVar[str] = "palmchat"  # the manifest's name for the template
    vocab_size: int
    pad_id: int
    end_id: int
    special_ids: frozenset[int]
    _special_text: dict[int, str]  # each special id's text, shown by decode when asked

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end a generation (not output); the end token first."""
        return (self.end_id,)

    @abstractmethod
    def chat_ids(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of ``messages`` under this tokenizer's chat template; with
        ``add_generation_prompt`` the opening of the assistant's reply follows."""

    @abstractmethod
    def training_example(
        self, messages: Sequence[Mapping[str, Any]]
    ) -> tuple[list[int], list[bool]]:
        """Ids of the conversation and a loss mask, True on assistant content and its end."""

    def encode(self, text: str) -> list[int]:
        """Encode plain text; never yields a special id. Lone surrogates become U+FFFD."""
        if not isinstance(text, str):
            raise TypeError(f"encode() needs a str, got {type(text).__name__}")
        return self._encode(_SURROGATES.sub("\ufffd", text)) if text else []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Decode ids; invalid UTF-8 becomes U+FFFD, specials are dropped or shown as markers."""
        parts: list[str] = []
        buf = bytearray()
        for i in ids:
            if i in self.special_ids:
                if not skip_special_tokens:
                    parts += [buf.decode("utf-8", errors="replace"), self._special_text[i]]
                    buf.clear()
            else:
                buf += self.token_bytes(i)
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of a non-special token (b"" for specials and unused ids)."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size})")
        return b"" if token_id in self.special_ids else self._token_bytes(token_id)

    def save(self, path: str | Path) -> Path:
        """Write one ``tokenizer.json`` (``path`` is the file or an existing directory)."""
        p = Path(path)
        if p.is_dir():
            p = p / FILE_NAME
        p.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": _FORMAT, "version": 1, "kind": self.kind}
        data["special_tokens"] = self.special_tokens()
        p.write_text(json.dumps({**data, **self._to_json()}, ensure_ascii=False), "utf-8")
        return p

    @abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """The special tokens' texts and ids."""

    @abstractmethod
    def _encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def _token_bytes(self, token_id: int) -> bytes: ...

    @abstractmethod
    def _to_json(self) -> dict[str, Any]: ...


class NativeTokenizer(Tokenizer):
    """palmchat's own tokenizers: the five control tokens at consecutive ids, and palmchat's
    template ``<role> content <|end|>`` per message."""

    system_id: int
    user_id: int
    assistant_id: int

    def _set_specials(self, first_id: int, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        ids = range(first_id, first_id + len(SPECIAL_TOKENS))
        self.pad_id, self.system_id, self.user_id, self.assistant_id, self.end_id = ids
        self._special_text: dict[int, str] = dict(zip(ids, SPECIAL_TOKENS, strict=True))
        self.special_ids = frozenset(ids)

    def role_id(self, role: str) -> int:
        """Id of the control token opening a ``system``/``user``/``assistant`` turn."""
        return {"system": self.system_id, "user": self.user_id, "assistant": self.assistant_id}[
            role
        ]

    def special_tokens(self) -> dict[str, int]:
        return {t: i for i, t in self._special_text.items()}

    def chat_ids(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        ids, _ = _render(self, messages)
        if add_generation_prompt:
            ids.append(self.assistant_id)
        return ids

    def training_example(
        self, messages: Sequence[Mapping[str, Any]]
    ) -> tuple[list[int], list[bool]]:
        return _render(self, messages)


def _is_byte_level(pre: Any) -> bool:
    return (
        isinstance(pre, dict) and pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space")
    )


def _digit_rule(pre: Any) -> bool | None:
    """Whether an HF pre-tokenizer spec splits digits; None if it is not one palmchat accepts.

    Accepted: ``ByteLevel`` alone (digits not split, the first tokenizers) or
    ``Sequence([Digits(individual_digits=True), ByteLevel])``.
    """
    if _is_byte_level(pre):
        return False
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers")
        if (
            isinstance(parts, list)
            and len(parts) == 2
            and isinstance(parts[0], dict)
            and parts[0].get("type") == "Digits"
            and parts[0].get("individual_digits") is True
            and _is_byte_level(parts[1])
        ):
            return True
    return None


class BPETokenizer(NativeTokenizer):
    """Byte-level BPE; specials are ids 0..4, HF BPE id ``i`` is palmchat id ``i + 5``.

    New tokenizers pre-tokenize every digit alone (``splits_digits``), so ``"2026"`` is four
    tokens; files trained before that (ByteLevel only) load and encode as they always did.
    """

    kind: ClassVar[str] = "bpe"
    offset: ClassVar[int] = len(SPECIAL_TOKENS)

    def __init__(self, hf: HFTokenizer) -> None:
        spec = json.loads(hf.to_str())
        splits = _digit_rule(spec.get("pre_tokenizer"))
        if (
            (spec.get("model") or {}).get("type") != "BPE"
            or splits is None
            or spec.get("normalizer") is not None
            or spec.get("added_tokens")
        ):
            raise TokenizerError(
                "need a byte-level BPE (pre-tokenizer ByteLevel with add_prefix_space=False, "
                "alone or after Digits(individual_digits=True); no normalizer, no added tokens)"
            )
        self._hf = hf
        self._splits_digits = splits
        n = hf.get_vocab_size(with_added_tokens=True)
        try:
            # an id without a token gives None, whose TypeError is the refusal below
            table = [
                bytes(_BYTE_OF_CHAR[c] for c in hf.id_to_token(i))  # type: ignore[union-attr]
                for i in range(n)
            ]
        except (KeyError, TypeError) as e:
            raise TokenizerError(f"BPE vocab is not byte-level: {e!r}") from e
        self._bytes = table
        self._set_specials(0, self.offset + n)

    @property
    def splits_digits(self) -> bool:
        """True when every digit is pre-tokenized alone, so no token holds a digit and more."""
        return self._splits_digits

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 2048,
        min_frequency: int = 2,
        split_digits: bool = True,
    ) -> BPETokenizer:
        """Train on ``texts``; ``vocab_size`` counts the specials (the result may be smaller).

        With ``split_digits`` each digit is its own pre-token, hence always exactly one token.
        """
        if vocab_size < cls.offset + 256:
            raise ValueError(f"vocab_size must be >= {cls.offset + 256}, got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.pre_tokenizer = (
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
            if split_digits
            else byte_level
        )
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - cls.offset,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    def _encode(self, text: str) -> list[int]:
        return [i + self.offset for i in self._hf.encode(text, add_special_tokens=False).ids]

    def _token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id - self.offset]

    def _to_json(self) -> dict[str, Any]:
        return {"id_offset": self.offset, "hf_tokenizer": json.loads(self._hf.to_str())}


class ByteTokenizer(NativeTokenizer):
    """Raw UTF-8 bytes as ids 0..255, for imported PaLM-rlhf-pytorch models.

    With ``num_tokens >= 261`` the specials are ids 256..260 and every text round-trips.
    With fewer ids the specials reuse the control bytes 1..5 (``\\x01``..``\\x05``); those
    five characters in user text are then encoded as U+FFFD so they cannot be injected
    (such text does not round-trip exactly). Ids above 260 are unused and decode to "".
    """

    kind: ClassVar[str] = "byte"

    def __init__(self, num_tokens: int) -> None:
        if num_tokens < 256:
            raise ValueError(f"ByteTokenizer needs num_tokens >= 256, got {num_tokens}")
        self.num_tokens = num_tokens
        self._set_specials(256 if num_tokens >= 261 else 1, num_tokens)
        self._scrub = None if num_tokens >= 261 else re.compile("[\x01-\x05]")

    def _encode(self, text: str) -> list[int]:
        if self._scrub is not None:
            text = self._scrub.sub("\ufffd", text)
        return list(text.encode("utf-8"))

    def _token_bytes(self, token_id: int) -> bytes:
        return bytes((token_id,)) if token_id < 256 else b""

    def _to_json(self) -> dict[str, Any]:
        return {"num_tokens": self.num_tokens}


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a ``tokenizer.json`` file or a directory containing one."""
    p = Path(path)
    if p.is_dir():
        p = p / FILE_NAME
    try:
        data = json.loads(p.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read tokenizer file {p}: {e}") from e
    try:
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise TokenizerError("not a palmchat tokenizer file")
        kind = data.get("kind")
        tok: Tokenizer
        if kind == BPETokenizer.kind:
            if data.get("id_offset") != BPETokenizer.offset:
                raise TokenizerError(f"unsupported id_offset {data.get('id_offset')!r}")
            try:
                hf = HFTokenizer.from_str(json.dumps(data["hf_tokenizer"]))
            except Exception as e:  # the Rust side raises plain Exception
                raise TokenizerError(f"bad hf_tokenizer: {e}") from e
            tok = BPETokenizer(hf)
        elif kind == ByteTokenizer.kind:
            num = data.get("num_tokens")
            if not isinstance(num, int) or isinstance(num, bool):
                raise TokenizerError(f"bad num_tokens {num!r}")
            tok = ByteTokenizer(num)
        elif kind == "hf":
            from shared.hf_tokenizer import HuggingFaceTokenizer  # it subclasses Tokenizer

            tok = HuggingFaceTokenizer.from_json(data)
        else:
            raise TokenizerError(f"unknown tokenizer kind {kind!r}")
        stored = data.get("special_tokens")
        if stored != tok.special_tokens():
            raise TokenizerError(f"special_tokens {stored!r} do not match the {kind} layout")
    except (ValueError, KeyError, TypeError) as e:
        raise TokenizerError(f"invalid tokenizer file {p}: {e}") from e
    return tok


def checked_messages(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(role, content) of each message; ValueError naming the first that no template takes."""
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"message {i}: expected a dict, got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i}: invalid role {role!r} (expected one of {ROLES})")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a str, got {type(content).__name__}")
        out.append((role, content))
    return out


def _render(
    tok: NativeTokenizer, messages: Sequence[Mapping[str, Any]]
) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    mask: list[bool] = []
    for role, content in checked_messages(messages):
        body = [*tok.encode(content), tok.end_id]
        ids += [tok.role_id(role), *body]
        mask += [False] + [role == "assistant"] * len(body)
    return ids, mask


def apply_chat_template(
    tok: Tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
) -> list[int]:
    """The chat template of ``tok``: palmchat's ``<role> content <|end|>`` per message, then
    ``<|assistant|>`` if asked; an imported checkpoint's own template for its tokenizer."""
    return tok.chat_ids(messages, add_generation_prompt)


def render_training_example(
    tok: Tokenizer, messages: Sequence[Mapping[str, Any]]
) -> tuple[list[int], list[bool]]:
    """Ids of the conversation and a loss mask, True on assistant content and its end token
    (``<|end|>`` under palmchat's template)."""
    return tok.training_example(messages)


class StreamDecoder:
    """Incremental detokenizer: holds back bytes of an incomplete UTF-8 character.

    ``"".join(push(i) for i in ids) + flush() == tok.decode(ids)``; specials give no text.
    """

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one id; return the text it completes (possibly "")."""
        return self._dec.decode(self.tok.token_bytes(token_id))

    def flush(self) -> str:
        """Return what is left (incomplete bytes become U+FFFD) and reset."""
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out
