"""Request, response, stream-chunk and error schemas of the OpenAI-compatible API.

Field names, defaults and bounds follow OpenAI's chat completions API so the official SDK works
unchanged; palmchat's own additions (``top_k``, ``conversation_id``) are optional extras.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.responses import Response

from shared.messages import normalise_message
from shared.schema import LABELS

# a label a user may put on an answer (shared.schema.LABELS)
Label = Literal[
    "harmful", "untrue", "unhelpful", "spam", "pii", "hate_speech", "sexual_content",
    "violence", "refusal_was_wrong",
]  # fmt: skip


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class APIError(Exception):
    """An error that the API turns into ``{"error": {...}}`` with the given HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return ErrorResponse(
            error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        ).model_dump()


def _storable_text(data: Any) -> Any:
    """Refuse strings with lone surrogates (``"\\ud800"`` in JSON): they are not Unicode
    scalar values, so the conversation log cannot store them as UTF-8. Walks nested lists and
    dicts iteratively (request bodies may be deeply nested)."""
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("text must be valid Unicode (no lone surrogates)") from None
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
    return data


class StorableRequest(BaseModel):
    """A request body whose text goes into the conversation log: lone surrogates are refused."""

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        return _storable_text(data)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def normalised(self) -> dict[str, str]:
        """``{"role", "content"}`` as templated and stored (see :mod:`shared.messages`)."""
        return normalise_message({"role": self.role, "content": self.content})


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI parameters that change nothing palmchat generates: accepted and ignored, as OpenAI
# itself treats them (every conversation is logged whatever ``store`` says)
IGNORED_PARAMS = frozenset(
    {"metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
)
# OpenAI parameters palmchat does not honour: a 400 naming them, never a silent drop
UNSUPPORTED_PARAMS = {
    "functions": "function calling",
    "function_call": "function calling",
    "audio": "audio output",
    "prediction": "predicted outputs",
    "web_search_options": "web search",
    "reasoning_effort": "reasoning effort (this is not a reasoning model)",
    "verbosity": "verbosity (this is not a reasoning model)",
}
MAX_LOGIT_BIAS = 1024


def unsupported_reason(req: ChatCompletionRequest) -> tuple[str, str] | None:
    """(parameter, message) for the first parameter of ``req`` that palmchat would have to
    drop silently, or None. Unknown parameters are refused as OpenAI refuses them."""
    extra = dict(req.model_extra or {})
    for name in extra:
        if name in IGNORED_PARAMS:
            continue
        if name in UNSUPPORTED_PARAMS:
            return name, f"palmchat does not support {UNSUPPORTED_PARAMS[name]} ({name!r})"
        if name == "modalities":
            if extra[name] in (["text"], None):
                continue
            return name, 'palmchat generates text only: modalities must be ["text"]'
        if name in ("tools", "tool_choice", "parallel_tool_calls"):
            continue  # below
        return name, f"Unrecognized request argument supplied: {name}"
    tools, choice = extra.get("tools"), extra.get("tool_choice")
    if choice not in (None, "none", "auto"):
        return "tool_choice", (
            f"palmchat does not support tool calling: tool_choice {choice!r} cannot be honoured"
        )
    if tools and choice != "none":
        return "tools", (
            'palmchat does not support tool calling; leave out tools, or set tool_choice to "none"'
        )
    return None


class JsonSchemaFormat(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    # named "schema" on the wire; the attribute name would shadow BaseModel's own
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(populate_by_name=True, extra="forbid")


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text``, ``json_object`` (any JSON object) or
    ``json_schema`` (``json_schema.schema``); JSON is enforced by constrained decoding, strict
    or not."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema object')
        return self


class SamplingRequest(StorableRequest):
    """What the chat and the text completion requests share: the model and the sampling
    fields (OpenAI's, then vLLM's extras; see server.engine.SamplingParams)."""

    model_config = ConfigDict(extra="allow")  # extras are refused by unsupported_reason

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # OpenAI's: token id (as a string) -> bias in [-100, 100] added to its logit
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int = Field(0, ge=0)
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past the end token
    min_tokens: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    stop_token_ids: list[int] | None = Field(None, max_length=64)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return None
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        for key, value in v.items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"biases must be in [-100, 100], got {value!r} for {key}")
        return v


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    conversation_id: str | None = None
    # structured outputs: OpenAI's response_format, and vLLM's guided_* extras
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = Field(None, min_length=1, max_length=4096)
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        wanted = [
            name
            for name in ("guided_json", "guided_regex", "guided_choice")
            if getattr(self, name) is not None
        ]
        if self.response_format is not None and self.response_format.type != "text":
            wanted.append("response_format")
        if len(wanted) > 1:
            raise ValueError(f"at most one of {', '.join(wanted)} may constrain the output")
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message must not be from the assistant")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def json_response(model: BaseModel) -> Response:
    """``model`` as a JSON response, serialised by pydantic itself: FastAPI's generic
    encoder walks the model in Python, several times the cost for every reply."""
    return Response(model.model_dump_json(by_alias=True), media_type="application/json")


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ResponseHead(BaseModel):
    """What every completion response and streamed chunk opens with; ``object`` is narrowed to
    one literal by each kind."""

    id: str
    object: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None


class ChatCompletionResponse(ResponseHead):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[Choice]
    usage: Usage
    conversation_id: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(ResponseHead):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "palmchat"
    # vLLM's extras: the policy version this id is served by, and its context length
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AnswerRef(StorableRequest):
    """One answer: a completion and the index of its choice."""

    completion_id: str = Field(min_length=1, max_length=100)
    choice_index: int = Field(0, ge=0, le=2**31 - 1)  # past it, no database column holds it


class FeedbackRequest(AnswerRef):
    rating: Literal[1, -1]
    reason: str | None = Field(None, max_length=2000)


class LabelRequest(AnswerRef):
    labels: list[Label] = Field(min_length=1, max_length=len(LABELS))
    note: str | None = Field(None, max_length=2000)


class RankingRequest(StorableRequest):
    completion_id: str = Field(min_length=1, max_length=100)
    ranking: list[int] = Field(min_length=2, max_length=16)

    @field_validator("ranking")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or min(v) < 0:
            raise ValueError("ranking must list distinct, non-negative choice indices")
        return v
