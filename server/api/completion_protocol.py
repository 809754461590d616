"""The request and response shapes of ``POST /v1/completions`` (OpenAI's legacy text
completions), and the parameters palmchat refuses rather than drop silently."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from server.api.protocol import (
    MAX_LOGIT_BIAS,
    ResponseHead,
    StreamOptions,
    Usage,
    _storable_text,
)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint
MAX_LOGPROBS = 5  # OpenAI's bound on the legacy ``logprobs``
MAX_PROMPTS = 64  # each is an engine request; past this, send several requests

TokenIds = list[StrictInt]  # strict: JSON true or 1.5 is not a token id


class TextCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras are refused by unsupported_reason

    model: str
    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        description="a string, a list of strings, a list of token ids, or a list of those"
    )
    max_tokens: int | None = Field(
        DEFAULT_MAX_TOKENS, ge=1, description="null: as many as the context leaves (vLLM)"
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    suffix: str | None = Field(None, description="not supported: anything but null is a 400")
    best_of: int | None = Field(None, ge=1, description="only equal to n (no server-side best)")
    # vLLM's sampling extras (see server.engine.SamplingParams)
    top_k: int = Field(0, ge=0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    stop_token_ids: list[int] | None = Field(None, max_length=64)

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        # echoed text and the model name go back out as JSON, which cannot carry them
        return _storable_text(data)

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

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 4 or not all(stops)):
            raise ValueError("at most 4 stop sequences, each non-empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None and len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        bad = [k for k, b in (v or {}).items() if not k.isdigit() or not -100.0 <= b <= 100.0]
        if bad:
            raise ValueError(f"keys must be token ids and biases in [-100, 100]; not {bad[0]!r}")
        return v


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
