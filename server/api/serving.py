"""Chat completion logic shared by the REST/SSE routes and the WebSocket.

Request → chat template → engine stream → OpenAI response or chunks; after the last token the
completion is written to the conversation log (off the event loop), or marked incomplete when
the client went away mid-stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi.concurrency import run_in_threadpool

from server.api.chat_log import log_in_background, log_to_db
from server.api.deps import AppState
from server.api.moderation import Decision, Screen, refusal_deltas
from server.api.protocol import (
    APIError,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    TokenLogprob,
    TopLogprob,
    Usage,
    new_completion_id,
    unsupported_reason,
)
from server.api.protocol import (
    Choice as ResponseChoice,
)
from server.api.sampling import sampling_params
from server.api.structured import guided_decoding
from server.engine import Delta as EngineDelta
from server.engine import DeltaStream, EngineOverloaded, EngineStats, SamplingParams
from shared.keys import Principal
from shared.rollout.state import routes_to_canary
from shared.store import NotFound, continuation_prompt, is_full_history
from shared.tokenizer import Tokenizer, apply_chat_template

log = logging.getLogger(__name__)

MODEL_ALIAS = "palmchat"
DEFAULT_MAX_TOKENS = 256


@dataclass
class CandidateState:
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class EngineRun:
    """One engine request and its candidates so far: what :func:`run_engine` drives."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    tokenizer: Tokenizer
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)
    # the version it is routed to (None: the one serving new requests; a canary's otherwise)
    version: str | None = None
    policy_version: str = ""
    candidates: list[CandidateState] = field(default_factory=list)
    # moderation: the input's decision (a blocked request never reaches the engine) and the
    # output checks of the candidates (None: not moderated)
    input_decision: Decision | None = None
    screen: Screen | None = None

    @property
    def blocked(self) -> bool:
        return self.input_decision is not None and self.input_decision.action == "block"

    def moderation_of(self, index: int) -> dict[str, Any] | None:
        """What the log stores with candidate ``index``: the input's and its reply's
        decisions."""
        if self.input_decision is None and self.screen is None:
            return None
        out = self.screen.decisions[index] if self.screen is not None else None
        return {
            "input": self.input_decision.to_dict() if self.input_decision else None,
            "output": out.to_dict() if out is not None else None,
        }

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.candidates)

    def usage(self) -> Usage:
        out = sum(c.tokens for c in self.candidates)
        return Usage(
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=out,
            total_tokens=len(self.prompt_ids) + out,
        )


@dataclass(kw_only=True)
class Completion(EngineRun):
    """A chat request in flight: its engine run, the request and where it came from."""

    request: ChatCompletionRequest
    principal: Principal
    messages: list[dict[str, str]]
    conversation_id: str | None = None


class Backend(Protocol):
    """What serving needs from ``state.engine``: the in-process
    :class:`~server.engine.AsyncEngine`, or :class:`server.triton.client.TritonBackend` (the
    same calls over Triton's gRPC streaming API). ``version``, ``tokenizer`` and
    ``max_seq_len`` are those of the version that serves new requests; overload surfaces as
    ``EngineOverloaded`` (from ``generate`` or from its stream)."""

    @property
    def version(self) -> str: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def max_seq_len(self) -> int: ...

    @property
    def serving_beside(self) -> Collection[str]:
        """Versions served beside the current one to requests that name them (a canary)."""
        ...

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        version: str | None = None,
    ) -> DeltaStream: ...

    def stats(self) -> EngineStats: ...

    async def load_policy(self, version: str, *, beside: bool = False) -> str: ...

    async def release(self, version: str) -> None: ...

    async def aclose(self) -> None: ...


def _engine(state: AppState) -> Backend:
    if state.engine is None:
        raise APIError(503, "no policy is loaded yet", type="service_unavailable")
    return state.engine


def serving_policy(engine: Backend) -> tuple[Tokenizer, int]:
    """Tokenizer and context length of the version that serves new requests."""
    return engine.tokenizer, engine.max_seq_len


def served_models(state: AppState) -> list[str]:
    return [MODEL_ALIAS, _engine(state).version]


def _token_text(tok: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    raw = tok.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def _convert_logprobs(tok: Tokenizer, items: list[Any], top_n: int) -> list[TokenLogprob]:
    out = []
    for lp in items:
        text, raw = _token_text(tok, lp.token_id)
        tops = []
        for token_id, value in lp.top[:top_n]:
            t, b = _token_text(tok, token_id)
            tops.append(TopLogprob(token=t, logprob=value, bytes=b))
        out.append(TokenLogprob(token=text, logprob=lp.logprob, bytes=raw, top_logprobs=tops))
    return out


def _validated_messages(state: AppState, req: ChatCompletionRequest) -> list[dict[str, str]]:
    """The request's messages as the chat template reads them, after the model check and the
    check that no parameter would be dropped silently (400/404 on misuse)."""
    refused = unsupported_reason(req)
    if refused is not None:
        name, message = refused
        code = (
            "unknown_parameter" if message.startswith("Unrecognized") else "unsupported_parameter"
        )
        raise APIError(400, message, param=name, code=code)
    if req.model not in served_models(state):
        raise APIError(
            404,
            f"model {req.model!r} does not exist or is not served; see GET /v1/models",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )
    return chat_messages(req.messages)


def chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """Request messages as the chat template reads them; 400 naming the message whose
    content cannot be templated, or is missing (a user or system message with no text: an
    answer to nothing would be logged and trained on as if it had been asked)."""
    out = []
    for i, m in enumerate(messages):
        try:
            out.append(m.normalised())
        except ValueError as e:  # the role is checked by the schema, so this is the content
            raise APIError(
                400, f"messages[{i}].content: {e}", param=f"messages.{i}.content"
            ) from None
        if m.content is None or (m.role != "assistant" and not out[-1]["content"]):
            raise APIError(
                400,
                f"messages[{i}].content: a {m.role} message needs non-empty content",
                param=f"messages.{i}.content",
                code="invalid_value",
            )
    return out


async def _continued(
    state: AppState, req: ChatCompletionRequest, who: Principal, messages: list[dict[str, str]]
) -> list[dict[str, str]]:
    """What a request with ``conversation_id`` is generated from (:func:`continuation_prompt`):
    404 before any token when the conversation is not the caller's own. With only new messages
    the log must be read, so a database that is away is a 503; a full history is generated as
    sent and its log write decides later (it may be spooled)."""
    assert req.conversation_id is not None
    try:
        return await run_in_threadpool(
            continuation_prompt, state.db, who.user_id, req.conversation_id, messages
        )
    except NotFound as e:
        raise APIError(404, str(e), type="not_found_error", param="conversation_id") from None
    except Exception:
        log.warning("could not read conversation %s", req.conversation_id, exc_info=True)
        if is_full_history(messages):
            return messages
        raise APIError(
            503,
            "the conversation log is unavailable, so the conversation's earlier turns cannot "
            "be read; retry, or send the whole history in messages",
            type="service_unavailable",
            code="conversation_log_unavailable",
            headers={"Retry-After": "1"},
        ) from None


async def prepare(state: AppState, req: ChatCompletionRequest, who: Principal) -> Completion:
    """Validate against the served policy, read the earlier turns of a continued conversation,
    and build the engine request (400/404/503 before any token is generated)."""
    messages = _validated_messages(state, req)
    if req.conversation_id is not None:
        messages = await _continued(state, req, who, messages)
    c = prepare_completion(state, req, who, messages)
    await moderate_input(state, c)
    return c


async def moderate_input(state: AppState, c: Completion) -> None:
    """Check the request's last user message and arm the output checks (moderation on)."""
    hook = state.moderation
    if hook is None or not hook.active:
        return
    last = next((m["content"] for m in reversed(c.messages) if m["role"] == "user"), "")
    c.input_decision = await hook.check("input", last)
    if not c.blocked:
        c.screen = Screen(hook, len(c.candidates))


def prepare_completion(
    state: AppState,
    req: ChatCompletionRequest,
    who: Principal,
    messages: list[dict[str, str]] | None = None,
) -> Completion:
    """Build the engine request from ``messages`` (default: the request's own, validated):
    exactly what the model is given and what the log stores with its reply."""
    engine = _engine(state)
    if messages is None:
        messages = _validated_messages(state, req)
    tok, context = serving_policy(engine)
    prompt_ids = apply_chat_template(tok, messages, add_generation_prompt=True)
    if len(prompt_ids) >= context:
        raise APIError(
            400,
            f"the messages take {len(prompt_ids)} tokens; this model's context is {context} tokens",
            param="messages",
            code="context_length_exceeded",
        )
    guided = guided_decoding(req, tok)
    room = context - len(prompt_ids)
    max_tokens = req.token_limit or min(DEFAULT_MAX_TOKENS, room)
    if max_tokens > room:
        raise APIError(
            400,
            f"max_tokens {max_tokens} + {len(prompt_ids)} prompt tokens exceed the "
            f"context of {context} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    params = sampling_params(
        req,
        tok,
        max_tokens,
        logprobs=req.logprobs,
        top_logprobs=req.top_logprobs or 0,
        guided=guided,
    )
    return Completion(
        id=new_completion_id(),
        request=req,
        principal=who,
        messages=messages,
        prompt_ids=prompt_ids,
        params=params,
        tokenizer=tok,
        version=routed_version(state, who, req.user),
        candidates=[CandidateState() for _ in range(req.n)],
        conversation_id=req.conversation_id,
    )


def routed_version(state: AppState, who: Principal, end_user: str | None) -> str | None:
    """The canary for the users it draws (:func:`shared.rollout.state.routes_to_canary`: by
    the request's ``user`` field when given, else by API key), None (the active version)
    for everyone else."""
    canary = state.canary
    if canary is None or canary.version not in _engine(state).serving_beside:
        return None
    user = f"user:{end_user}" if end_user else f"key:{who.key_id}"
    return canary.version if routes_to_canary(canary, user) else None


async def run_engine(state: AppState, c: EngineRun) -> AsyncGenerator[EngineDelta, None]:
    """Stream the engine's deltas for ``c``, updating its candidates; abort on early exit."""
    engine = _engine(state)
    metrics = state.metrics
    stream = None
    try:
        deltas: AsyncIterator[EngineDelta]
        if c.blocked:
            deltas = _replay(refusal_deltas(c.id, len(c.candidates), engine.version))
        else:
            if c.version is not None and c.version not in engine.serving_beside:
                c.version = None  # the canary ended since the request was routed
            stream = engine.generate(c.prompt_ids, c.params, request_id=c.id, version=c.version)
            deltas = stream if c.screen is None else c.screen.run(stream)
        async for delta in deltas:
            cand = c.candidates[delta.index]
            cand.text += delta.text
            cand.tokens += len(delta.token_ids)
            c.policy_version = delta.policy_version
            if delta.logprobs:
                cand.logprobs.extend(
                    _convert_logprobs(c.tokenizer, delta.logprobs, c.params.top_logprobs)
                )
            if delta.finish_reason is not None:
                cand.finish_reason = str(getattr(delta.finish_reason, "value", delta.finish_reason))
                metrics.finished.labels(cand.finish_reason).inc()
            if delta.metrics is not None:
                metrics.observe_candidate(delta.metrics)
            yield delta
        metrics.e2e.observe(time.perf_counter() - c.started)
    except EngineOverloaded as e:  # at submission (in-process) or as the first reply (Triton)
        raise APIError(
            429, str(e), type="rate_limit_error", code="overloaded", headers={"Retry-After": "1"}
        ) from None
    finally:
        # a reply moderation ended is still running in the engine
        if stream is not None and (not c.done or (c.screen is not None and c.screen.filtered)):
            stream.cancel()


async def _replay(deltas: list[EngineDelta]) -> AsyncIterator[EngineDelta]:
    for delta in deltas:
        yield delta


async def complete(state: AppState, c: Completion) -> ChatCompletionResponse:
    """Non-streaming: run to the end, log, answer."""
    try:
        async for _ in run_engine(state, c):
            pass
    except asyncio.CancelledError:
        log_in_background(state, c)
        raise
    await log_to_db(state, c)
    choices = [
        ResponseChoice(
            index=i,
            message={"role": "assistant", "content": cand.text},
            logprobs=ChoiceLogprobs(content=cand.logprobs) if c.params.logprobs else None,
            finish_reason=cand.finish_reason,
        )
        for i, cand in enumerate(c.candidates)
    ]
    return ChatCompletionResponse(
        id=c.id,
        created=c.created,
        model=c.request.model,
        system_fingerprint=c.policy_version,
        choices=choices,
        usage=c.usage(),
        conversation_id=c.conversation_id,
    )


def _chunk(c: Completion, choices: list[ChunkChoice], usage: Usage | None = None) -> str:
    return ChatCompletionChunk(
        id=c.id,
        created=c.created,
        model=c.request.model,
        system_fingerprint=c.policy_version or None,
        choices=choices,
        usage=usage,
    ).model_dump_json(exclude_none=False)


async def stream_chunks(state: AppState, c: Completion) -> AsyncGenerator[str, None]:
    """Streaming: OpenAI chunk JSON strings, then the usage chunk if asked; the caller adds
    ``[DONE]``. A client that disconnects cancels the request and it is logged incomplete."""
    include_usage = bool(c.request.stream_options and c.request.stream_options.include_usage)
    started = [False] * c.request.n
    try:
        async for delta in run_engine(state, c):
            choice = ChunkChoice(index=delta.index, delta=Delta(content=delta.text or None))
            if not started[delta.index]:
                choice.delta.role = "assistant"
                started[delta.index] = True
            if delta.logprobs and c.params.logprobs:
                n = len(delta.logprobs)
                choice.logprobs = ChoiceLogprobs(content=c.candidates[delta.index].logprobs[-n:])
            if delta.finish_reason is not None:
                choice.finish_reason = c.candidates[delta.index].finish_reason
            if (
                choice.delta.content is None
                and choice.delta.role is None
                and choice.finish_reason is None
            ):
                continue
            yield _chunk(c, [choice])
    except asyncio.CancelledError:
        log_in_background(state, c)
        raise
    except GeneratorExit:
        log_in_background(state, c)
        raise
    await log_to_db(state, c)
    if include_usage:
        yield _chunk(c, [], usage=c.usage())
