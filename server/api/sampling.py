"""A completion request's sampling fields mapped to the engine's
:class:`~server.engine.SamplingParams`, for the chat and the text completion routes alike."""

from __future__ import annotations

import re
from typing import Any

from server.api.protocol import APIError
from server.engine import GuidedDecoding, SamplingParams
from shared.tokenizer import Tokenizer

# request fields that SamplingParams takes as they are, under the same name
SAME_NAMED = (
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "ignore_eos",
    "repetition_penalty",
    "min_p",
    "min_tokens",
)


def sampling_params(
    req: Any,
    tok: Tokenizer,
    max_tokens: int,
    *,
    logprobs: bool,
    top_logprobs: int,
    guided: GuidedDecoding | None = None,
) -> SamplingParams:
    """The engine's sampling parameters from a chat or text completion request (the fields
    both share), 400 naming the parameter when one is out of range or names a token id
    outside the vocabulary."""
    vocab = tok.vocab_size
    for name, ids in (
        ("logit_bias", [int(k) for k in req.logit_bias or {}]),
        ("stop_token_ids", req.stop_token_ids or []),
    ):
        outside = [i for i in ids if i >= vocab]
        if outside:
            raise APIError(
                400,
                f"{name}: token id {outside[0]} is outside this model's vocabulary of {vocab}",
                param=name,
            )
    try:
        return SamplingParams(
            **{name: getattr(req, name) for name in SAME_NAMED},
            max_tokens=max_tokens,
            stop=tuple(req.stop or ()),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            logit_bias={int(k): v for k, v in req.logit_bias.items()} if req.logit_bias else None,
            stop_token_ids=tuple(req.stop_token_ids or ()),
            guided=guided,
        )
    except ValueError as e:  # "SamplingParams.<name> ...": the parameter of the same name
        named = re.match(r"SamplingParams\.(\w+)", str(e))
        raise APIError(400, str(e), param=named and named.group(1), code="invalid_value") from None
