"""Digits as single tokens: the pre-tokenizer rule that makes arithmetic and sorting learnable,
and tokenizers saved before it that keep loading with their own rule."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.tokenizer import (
    SPECIAL_TOKENS,
    BPETokenizer,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
)
from tests.shared.tokenizer_corpus import PROPS, TRICKY, corpus

DIGITS = frozenset(b"0123456789")
LEGACY_FILE = Path(__file__).parent / "data" / "tokenizer_bytelevel_v1.json"
NUMBERY = [
    "23+48",
    "7*5=35",
    "1,000",
    "-42",
    "x9",
    "2026",
    " 23",
    "What is 23 + 48?",
    "sort 91, 7, 45",
    "3.14159",
    "1e10",
    "0x1F",
    "abc123def",
    "mp3 covid19 4ever",
    "$1,299.99",
    "(-7)-(-8)=1",
    "  12\n3\t45",
    "<|user|>23<|end|>",
    "٣٤ ½ ① ²",
]


def _numberscorpus() -> list[str]:
    """Arithmetic, lists, years, prices and words with digits: BPE would merge these if allowed."""
    rng = random.Random(1)
    lines = []
    for _ in range(400):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        nums = ", ".join(str(rng.randint(-99, 999)) for _ in range(5))
        lines += [
            f"What is {a} + {b}? {a} + {b} = {a + b}.",
            f"Please sort {nums}. In {rng.randint(1900, 2030)} it cost ${rng.randint(1, 9)},999.",
            f"{a}*{b}={a * b} and {a}-{b}={a - b}; user{a} has item x{b % 10}.",
        ]
    return lines + NUMBERY + corpus()


@pytest.fixture(scope="module")
def digits_tok() -> BPETokenizer:
    return BPETokenizer.train(_numberscorpus(), vocab_size=800)


def _assert_every_digit_is_one_token(tok: Tokenizer, text: str) -> None:
    pieces = [tok.token_bytes(i) for i in tok.encode(text)]
    assert b"".join(pieces) == text.encode("utf-8")
    for piece in pieces:
        assert not DIGITS.intersection(piece) or len(piece) == 1, (text, piece)
    assert sum(len(p) == 1 and p[0] in DIGITS for p in pieces) == sum(
        c in "0123456789" for c in text
    )


def _numbery_text() -> st.SearchStrategy[str]:
    piece = st.one_of(
        st.integers(-(10**12), 10**12).map(str),
        st.floats(allow_nan=False, allow_infinity=False).map(str),
        st.sampled_from([*NUMBERY, " ", "+", "-", "*", "=", ",", ".", " plus ", "x", "abc", "\n"]),
        st.sampled_from(SPECIAL_TOKENS),
        st.text(alphabet=st.sampled_from("0123456789 +-*/=,.()$%xé漢😀\n"), max_size=12),
        st.text(max_size=8),
    )
    return st.lists(piece, max_size=12).map("".join)


def test_train_splits_digits_by_default_and_says_so(
    digits_tok: BPETokenizer, bpe_whole_numbers: BPETokenizer
) -> None:
    assert digits_tok.splits_digits is True
    assert bpe_whole_numbers.splits_digits is False
    with pytest.raises(AttributeError):
        digits_tok.splits_digits = False  # type: ignore[misc]


def test_no_token_in_the_vocab_holds_a_digit_and_anything_else(digits_tok: BPETokenizer) -> None:
    vocab = [digits_tok.token_bytes(i) for i in range(digits_tok.offset, digits_tok.vocab_size)]
    assert digits_tok.vocab_size > 300  # the corpus did train merges
    assert [v for v in vocab if DIGITS.intersection(v) and len(v) > 1] == []
    assert {bytes([d]) for d in DIGITS} <= set(vocab)


def test_the_same_corpus_without_the_rule_learns_multi_digit_tokens() -> None:
    whole = BPETokenizer.train(_numberscorpus(), vocab_size=800, split_digits=False)
    vocab = [whole.token_bytes(i) for i in range(whole.offset, whole.vocab_size)]
    assert any(sum(b in DIGITS for b in v) >= 2 for v in vocab)
    assert len(whole.encode("2026")) < 4


@pytest.mark.parametrize("text", NUMBERY)
def test_every_digit_is_exactly_one_token_in_typical_text(
    digits_tok: BPETokenizer, text: str
) -> None:
    _assert_every_digit_is_one_token(digits_tok, text)


def test_numbers_encode_digit_by_digit(digits_tok: BPETokenizer) -> None:
    t = digits_tok
    assert [t.token_bytes(i) for i in t.encode("2026")] == [b"2", b"0", b"2", b"6"]
    pieces = [t.token_bytes(i) for i in t.encode("-1,000 x9")]
    assert pieces[-1] == b"9" and pieces.count(b"0") == 3


@PROPS
@given(_numbery_text())
def test_every_digit_is_exactly_one_token_in_any_text(digits_tok: BPETokenizer, text: str) -> None:
    _assert_every_digit_is_one_token(digits_tok, text)


@PROPS
@given(st.text())
def test_any_unicode_text_round_trips_with_digits_split(
    digits_tok: BPETokenizer, text: str
) -> None:
    for t in (text, *TRICKY, *NUMBERY):
        assert digits_tok.decode(digits_tok.encode(t)) == t


@PROPS
@given(_numbery_text())
def test_numbers_next_to_role_markers_never_encode_to_control_ids(
    digits_tok: BPETokenizer, text: str
) -> None:
    ids = digits_tok.encode(text)
    assert not digits_tok.special_ids.intersection(ids)
    assert min(ids, default=5) >= 5 and digits_tok.decode(ids) == text


def test_save_load_round_trip_keeps_the_digit_rule(
    tmp_path: Path, digits_tok: BPETokenizer
) -> None:
    data = json.loads(digits_tok.save(tmp_path).read_text("utf-8"))
    assert (data["format"], data["version"], data["kind"]) == ("palmchat-tokenizer", 1, "bpe")
    assert data["special_tokens"] == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    assert data["hf_tokenizer"]["pre_tokenizer"]["type"] == "Sequence"
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BPETokenizer) and loaded.splits_digits
    for text in [*NUMBERY, *TRICKY]:
        assert loaded.encode(text) == digits_tok.encode(text)
        _assert_every_digit_is_one_token(loaded, text)


def test_save_load_round_trip_keeps_whole_numbers_for_old_style_tokenizers(
    tmp_path: Path, bpe_whole_numbers: BPETokenizer
) -> None:
    loaded = load_tokenizer(bpe_whole_numbers.save(tmp_path))
    assert isinstance(loaded, BPETokenizer) and not loaded.splits_digits
    for text in NUMBERY:
        assert loaded.encode(text) == bpe_whole_numbers.encode(text)


_BYTE_LEVEL = {
    "type": "ByteLevel",
    "add_prefix_space": False,
    "trim_offsets": True,
    "use_regex": True,
}
_DIGITS = {"type": "Digits", "individual_digits": True}


def _seq(*parts: dict[str, object]) -> dict[str, object]:
    return {"type": "Sequence", "pretokenizers": list(parts)}


@pytest.mark.parametrize(
    "pre",
    [
        None,
        {"type": "Whitespace"},
        {"type": "BertPreTokenizer"},
        {**_BYTE_LEVEL, "add_prefix_space": True},
        _DIGITS,
        _seq(_BYTE_LEVEL),
        _seq({"type": "Digits", "individual_digits": False}, _BYTE_LEVEL),
        _seq(_BYTE_LEVEL, _DIGITS),
        _seq(_DIGITS, {**_BYTE_LEVEL, "add_prefix_space": True}),
        _seq(_DIGITS, _BYTE_LEVEL, {"type": "Whitespace"}),
        _seq(_DIGITS, {"type": "Whitespace"}),
        _seq(_DIGITS, _seq(_BYTE_LEVEL)),
    ],
)
def test_hand_edited_pre_tokenizer_is_refused(
    tmp_path: Path, digits_tok: BPETokenizer, pre: dict[str, object] | None
) -> None:
    from tokenizers import Tokenizer as HF

    data = json.loads(digits_tok.save(tmp_path).read_text("utf-8"))
    data["hf_tokenizer"]["pre_tokenizer"] = pre
    HF.from_str(json.dumps(data["hf_tokenizer"]))  # the library accepts it; palmchat must not
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), "utf-8")
    with pytest.raises(TokenizerError, match="pre-tokenizer"):
        load_tokenizer(tmp_path)


def _library_ids(path: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer as HF

    hf = HF.from_str(json.dumps(json.loads(path.read_text("utf-8"))["hf_tokenizer"]))
    return [i + 5 for i in hf.encode(text, add_special_tokens=False).ids]


def test_old_format_file_loads_and_encodes_exactly_as_before() -> None:
    # a frozen copy of the first bundled seed's tokenizer (ByteLevel only, before digit splitting)
    tok = load_tokenizer(LEGACY_FILE)
    assert isinstance(tok, BPETokenizer) and not tok.splits_digits
    assert (tok.vocab_size, tok.pad_id, tok.end_id) == (2048, 0, 4)
    ids = tok.encode("What is 23 + 48?")
    assert ids == _library_ids(LEGACY_FILE, "What is 23 + 48?") == [355, 266, 942, 433, 850, 35]
    assert [tok.token_bytes(i) for i in ids][2:5] == [b" 23", b" +", b" 48"]
    for text in [*NUMBERY, *TRICKY]:
        assert tok.encode(text) == _library_ids(LEGACY_FILE, text)
        assert tok.decode(tok.encode(text)) == text


def test_bundled_seed_tokenizer_loads_and_encodes_like_the_library() -> None:
    from shared.bootstrap import SEED_DIR

    path = SEED_DIR / "tokenizer.json"
    tok = load_tokenizer(path)
    for text in ["What is 23 + 48?", *NUMBERY]:
        assert tok.encode(text) == _library_ids(path, text)
    if tok.splits_digits:
        _assert_every_digit_is_one_token(tok, "What is 23 + 48?")
