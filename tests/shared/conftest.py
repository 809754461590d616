"""Tokenizers the tokenizer tests share: trained once per module on the same corpus."""

from __future__ import annotations

import pytest

from shared.tokenizer import BPETokenizer
from tests.shared.tokenizer_corpus import corpus


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(corpus(), vocab_size=400)


@pytest.fixture(scope="module")
def bpe_whole_numbers() -> BPETokenizer:
    """The first tokenizers' rule (digits not split), still what older versions load."""
    return BPETokenizer.train(corpus(), vocab_size=400, split_digits=False)
