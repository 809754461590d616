"""An imported checkpoint's Hugging Face tokenizer and its Jinja chat template.

The checkpoint's ``tokenizer.json`` is kept whole, with the ids the model was trained on. Its
chat template is rendered in Jinja's immutable sandbox (a template is code from whoever made
the checkpoint): the environment transformers renders with (``trim_blocks``, ``lstrip_blocks``,
loop controls, ``raise_exception``, ``strftime_now``, a non-escaping ``tojson``), the messages,
``add_generation_prompt`` and the special tokens' texts.

*Control tokens* are the special tokens and the added tokens the template writes. Text never
encodes to them: :meth:`HuggingFaceTokenizer.encode` reads a control token's text in user text
as ordinary characters, and a chat is tokenized so that only the template's own control tokens
become ids (transformers' ``sanitize_control_tokens``). Without control text in the messages -
nearly always - the rendered chat is tokenized in one piece, exactly as transformers does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as RustTokenizer

from shared.tokenizer import _BYTE_OF_CHAR, Tokenizer, TokenizerError, checked_messages

# the special tokens a template may name, as transformers passes them
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
# the keyword arguments a saved tokenizer restores (beside the HF tokenizer's own JSON)
_SAVED_OPTIONS = (
    "chat_template",
    "num_tokens",
    "template_tokens",
    "end_token",
    "stop_tokens",
    "pad_token",
)
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# stands in for control text inside a message while its chat is rendered (supplementary
# private use: no tokenizer has a token for it)
_MARK_OPEN, _MARK_CLOSE = "\U000f0000", "\U000f0001"
_MARK = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")


class ChatTemplateError(ValueError):
    """The chat template refused the messages (its ``raise_exception``) or failed to render."""


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' marker of assistant text for
    its training masks) renders its body; palmchat finds assistant spans by prefixes."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """Jinja's ``namespace()`` that stores no underscore names: the sandbox hides those from
    reads, and a template need not write any."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Namespace's own signature
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a template may not store {name!r}")


def _unmarked(text: str) -> str:
    """``text`` without the characters that mark control text while a chat renders."""
    return text.replace(_MARK_OPEN, "\ufffd").replace(_MARK_CLOSE, "\ufffd")


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
    """The template in a sandboxed environment; ChatTemplateError if it does not parse."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_Generation, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        namespace=_Namespace,
    )
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not parse: {e}") from None


class HuggingFaceTokenizer(Tokenizer):
    """A checkpoint's BPE ``tokenizer.json`` (byte-level, or sentencepiece-style pieces with
    byte fallback) with its chat template; ids are the checkpoint's own. Ids from the
    tokenizer's size up to the model's ``num_tokens`` are unused and decode to nothing."""

    kind: ClassVar[str] = "hf"
    chat_template_kind: ClassVar[str] = "jinja"

    def __init__(
        self,
        spec: dict[str, Any],
        *,
        chat_template: str,
        num_tokens: int,
        template_tokens: Mapping[str, str],
        end_token: str,
        stop_tokens: Sequence[str] = (),
        pad_token: str | None = None,
    ) -> None:
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise TokenizerError(f"need a BPE tokenizer.json, got a {model.get('type')!r} model")
        try:
            self._hf = RustTokenizer.from_str(json.dumps(spec))
            self._plain = RustTokenizer.from_str(json.dumps(spec))
        except Exception as e:  # the Rust side raises plain Exception
            raise TokenizerError(f"tokenizer.json does not load: {e}") from None
        self._plain.encode_special_tokens = True  # special-token text in user text is text
        self._spec, self.chat_template = spec, chat_template
        self.template_tokens = dict(template_tokens)
        self._template = compile_template(chat_template)
        added = [t for t in spec.get("added_tokens") or [] if isinstance(t, dict)]
        self._added = {int(t["id"]): str(t["content"]) for t in added}
        specials = {str(t["content"]): int(t["id"]) for t in added if t.get("special")}
        self._specials = specials
        self.special_ids = frozenset(specials.values())
        self._special_text = {i: t for t, i in specials.items()}
        control = dict(specials)
        control.update((c, i) for i, c in self._added.items() if c in chat_template)
        self._control_map = control
        self._control_ids = frozenset(control.values())
        by_length = sorted(control, key=len, reverse=True)
        self._control = re.compile("|".join(map(re.escape, by_length))) if control else None
        size = self._hf.get_vocab_size(with_added_tokens=True)
        if size > num_tokens:
            raise TokenizerError(f"tokenizer has {size} ids, the model only {num_tokens}")
        self.num_tokens, self.vocab_size = num_tokens, num_tokens
        self._bytes = [self._piece_bytes(i) for i in range(size)]
        self.end_id = self._id_of(end_token, "end token")
        stops = [self.end_id, *(self._id_of(t, "stop token") for t in stop_tokens)]
        self._stops = tuple(dict.fromkeys(stops))
        self.pad_id = self._id_of(pad_token, "pad token") if pad_token else self.end_id

    def _id_of(self, token: str, what: str) -> int:
        i = self._hf.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{what} {token!r} is not in the tokenizer")
        return i

    def _piece_bytes(self, i: int) -> bytes:
        """What id ``i`` decodes to: an added token's text, else its BPE piece as bytes."""
        if i in self._added:
            return self._added[i].encode()
        piece = self._hf.id_to_token(i)
        if piece is None:
            return b""
        if self.byte_level:
            if all(c in _BYTE_OF_CHAR for c in piece):
                return bytes(_BYTE_OF_CHAR[c] for c in piece)
            return piece.encode()
        if m := _BYTE_PIECE.fullmatch(piece):
            return bytes((int(m.group(1), 16),))
        return piece.replace("\u2581", " ").encode()

    @cached_property
    def byte_level(self) -> bool:
        """Pieces are GPT-2's byte alphabet (else sentencepiece's: ``▁`` for a space)."""
        return "ByteLevel" in json.dumps(self._spec.get("decoder"))

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self._stops

    # -- encoding ---------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        if self._control is None or not self._control.search(text):
            return self._plain.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        start = 0
        for m in self._control.finditer(text):
            ids += self._plain.encode(text[start : m.start()], add_special_tokens=False).ids
            ids += self._as_text(m.group())
            start = m.end()
        return ids + self._plain.encode(text[start:], add_special_tokens=False).ids

    def _as_text(self, piece: str) -> list[int]:
        """Ids of a control token's text as characters: the normalizer, pre-tokenizer and BPE
        model without the added vocabulary that would match it whole."""
        hf = self._hf
        text = hf.normalizer.normalize_str(piece) if hf.normalizer is not None else piece
        words = hf.pre_tokenizer.pre_tokenize_str(text) if hf.pre_tokenizer else [(text, None)]
        ids = [t.id for word, _ in words for t in hf.model.tokenize(word)]
        if any(i in self._control_ids for i in ids) and len(piece) > 1:
            return [i for c in piece for i in self._as_text(c)]
        return ids

    def chat_text(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """The template's rendering of ``messages`` (role and content each)."""
        chat = [{"role": r, "content": c} for r, c in checked_messages(messages)]
        try:
            return self._template.render(
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.template_tokens,
            )
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the chat template refused the messages: {e}") from None

    def chat_ids(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        pairs = checked_messages(messages)
        control = self._control
        if control is None or not any(control.search(c) for _, c in pairs):
            text = self.chat_text(messages, add_generation_prompt)
            return self._hf.encode(text, add_special_tokens=False).ids
        # control text in a message: render with marks in its place, so that the template's
        # own control tokens are told apart from the user's text
        found: list[str] = []

        def mark(m: re.Match[str]) -> str:
            found.append(m.group())
            return f"{_MARK_OPEN}{len(found) - 1}{_MARK_CLOSE}"

        marked = [{"role": r, "content": control.sub(mark, _unmarked(c))} for r, c in pairs]
        text = self.chat_text(marked, add_generation_prompt)
        ids: list[int] = []
        start = 0
        for m in re.finditer(f"{control.pattern}|{_MARK.pattern}", text):
            ids += self._plain.encode(text[start : m.start()], add_special_tokens=False).ids
            if m.group().startswith(_MARK_OPEN):
                ids += self._as_text(found[int(m.group()[1:-1])])
            else:
                ids.append(self._control_map[m.group()])
            start = m.end()
        return ids + self._plain.encode(text[start:], add_special_tokens=False).ids

    def training_example(
        self, messages: Sequence[Mapping[str, Any]]
    ) -> tuple[list[int], list[bool]]:
        """The loss mask from prefixes: an assistant turn is what rendering it adds to the
        conversation before it plus the generation prompt, up to its last stop token."""
        pairs = checked_messages(messages)
        ids = self.chat_ids(messages, add_generation_prompt=False)
        mask = [False] * len(ids)
        for i, (role, _) in enumerate(pairs):
            if role != "assistant":
                continue
            before = self.chat_ids(messages[:i], add_generation_prompt=True)
            upto = self.chat_ids(messages[: i + 1], add_generation_prompt=False)
            if ids[: len(before)] != before or ids[: len(upto)] != upto:
                raise ChatTemplateError(
                    "the chat template does not render a conversation as its turns in sequence, "
                    "so its assistant turns cannot be found for training"
                )
            turn = range(len(before), len(upto))
            ends = [j for j in turn if ids[j] in self._stops]
            for j in range(len(before), ends[-1] + 1 if ends else len(upto)):
                mask[j] = True
        return ids, mask

    # -- storage ----------------------------------------------------------------------------
    def _token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id] if token_id < len(self._bytes) else b""

    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    def _to_json(self) -> dict[str, Any]:  # keys: hf_tokenizer and _SAVED_OPTIONS
        return {
            "num_tokens": self.num_tokens,
            "chat_template": self.chat_template,
            "template_tokens": self.template_tokens,
            "end_token": self._hf.id_to_token(self.end_id),
            "stop_tokens": [self._hf.id_to_token(i) for i in self._stops[1:]],
            "pad_token": self._hf.id_to_token(self.pad_id),
            "hf_tokenizer": self._spec,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HuggingFaceTokenizer:
        """The tokenizer :meth:`save` wrote (``load_tokenizer`` reads the wrapper)."""
        try:
            return cls(data["hf_tokenizer"], **{k: data[k] for k in _SAVED_OPTIONS})
        except ChatTemplateError as e:
            raise TokenizerError(str(e)) from None
