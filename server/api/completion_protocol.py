"""The request and response shapes of ``POST /v1/completions`` (OpenAI's legacy text
completions), and the parameters palmchat refuses rather than drop silently."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    StrictInt,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from server.api.protocol import ResponseHead, SamplingRequest, Usage

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint
MAX_LOGPROBS = 5  # OpenAI's bound on the legacy ``logprobs``
MAX_PROMPTS = 64  # each is an engine request; past this, send several requests

TokenIds = list[StrictInt]  # strict: JSON true or 1.5 is not a token id


class TextCompletionRequest(SamplingRequest):
    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        description="a string, a list of strings, a list of token ids, or a list of those"
    )
    max_tokens: int | None = Field(
        DEFAULT_MAX_TOKENS, ge=1, description="null: as many as the context leaves (vLLM)"
    )
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = Field(None, description="not supported: anything but null is a 400")
    best_of: int | None = Field(None, ge=1, description="only equal to n (no server-side best)")

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, v: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(v)
        except ValidationError:
            raise ValueError(
                "must be a string, a list of strings, a list of token ids (integers), or a "
                "list of token-id lists"
            ) from None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class TextCompletionResponse(ResponseHead):
    """The response, and (with ``usage`` null but for the last) each streamed chunk."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


# parameters this endpoint knows (declared above) and what OpenAI's legacy API names but
# palmchat cannot honour
UNSUPPORTED = {"suffix": "suffix (insertion)", "best_of": "best_of other than n"}


def unsupported_reason(req: TextCompletionRequest) -> tuple[str, str] | None:
    """(parameter, message) for the first parameter of ``req`` that palmchat would have to
    drop silently, or None. Unknown parameters are refused as OpenAI refuses them."""
    for name in req.model_extra or {}:
        return name, f"Unrecognized request argument supplied: {name}"
    if req.suffix is not None:
        return "suffix", f"palmchat does not support {UNSUPPORTED['suffix']} ('suffix')"
    if req.best_of is not None and req.best_of != req.n:
        return "best_of", (
            f"palmchat does not support {UNSUPPORTED['best_of']}: best_of {req.best_of} with "
            f"n {req.n} ('best_of')"
        )
    return None
