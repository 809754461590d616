"""OpenAI's legacy text completions (``POST /v1/completions``), as OpenAI and vLLM serve them.

The prompt is raw text, encoded as user text is (it never yields a control token), with no
chat template; or token ids, taken as given. Each prompt of a list is one engine request, and
its ``n`` choices are indexed prompt-major (``index = prompt_i * n + j``). Generation goes
through :func:`server.api.serving.run_engine`, so a full queue is a 429 with ``Retry-After``
and the metrics count these requests as they count chats. Text completions are not
conversations: nothing here is written to the conversation log.

``logprobs`` (0-5) gives, per token, its text, its logprob, the ``logprobs`` most likely
alternatives plus the chosen token, and its character offset in the choice's ``text`` (the
echoed prompt included, as vLLM counts it). Tokens that are not whole UTF-8 are shown as
``bytes:\\xNN...``, as OpenAI shows them. The engine computes no logprobs for prompt tokens,
so with ``echo`` the prompt's entries have null ``token_logprobs`` and ``top_logprobs``.
"""

from __future__ import annotations

import asyncio
import codecs
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import cast

from server.api import serving
from server.api.completion_protocol import (
    MAX_PROMPTS,
    UNSUPPORTED,
    CompletionChoice,
    CompletionLogprobs,
    TextCompletionRequest,
    TextCompletionResponse,
    unsupported_reason,
)
from server.api.deps import AppState
from server.api.protocol import (
    APIError,
    Usage,
)
from server.api.routes.chat import model_not_found
from server.api.sampling import sampling_params
from server.api.serving import CandidateState, EngineRun
from server.engine import Delta as EngineDelta
from server.engine import SamplingParams
from server.engine import TokenLogprob as EngineLogprob
from shared.keys import Principal
from shared.tokenizer import Tokenizer


def token_str(tok: Tokenizer, token_id: int) -> str:
    """A token as the legacy logprobs show it: its text, a control token's marker, or
    ``bytes:\\xNN`` for bytes that are not whole UTF-8 (distinct tokens stay distinct keys)."""
    if token_id in tok.special_ids:
        return tok.decode([token_id], skip_special_tokens=False)
    raw = tok.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class _Offsets:
    """Character offsets of successive tokens in text that starts at ``start``, decoded as
    the engine decodes it (invalid UTF-8 as U+FFFD). A token that begins inside a character
    sits at that character; one that breaks off an unfinished character, after its U+FFFD."""

    def __init__(self, start: int) -> None:
        self.at = start
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def next(self, raw: bytes) -> int:
        at = self.at
        pending = self._decoder.getstate()[0]
        if pending and raw and not _continues(pending, raw[0]):
            at += 1
        self.at += len(self._decoder.decode(raw))
        return at


def _continues(pending: bytes, byte: int) -> bool:
    try:
        codecs.getincrementaldecoder("utf-8")().decode(pending + bytes([byte]))
    except UnicodeDecodeError:
        return False
    return True


@dataclass
class Prompt:
    ids: list[int]
    text: str  # as sent, or the token ids decoded


@dataclass
class ChoiceState:
    """One choice: what was handed out so far, its logprobs and where the next token sits."""

    prompt: Prompt
    echo: bool
    top_n: int | None  # the request's logprobs; None: none asked for
    text: str = ""
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None
    offsets: _Offsets = field(init=False)
    started: bool = False

    def __post_init__(self) -> None:
        self.offsets = _Offsets(len(self.prompt.text) if self.echo else 0)
        if self.top_n is not None:
            self.logprobs = CompletionLogprobs()

    def take(self, tok: Tokenizer, delta: EngineDelta) -> CompletionChoice | None:
        """This delta as a piece of the choice (text and logprobs since the last piece, the
        echoed prompt first), added to the choice's whole; None when it adds nothing."""
        text, part = delta.text, None
        if self.logprobs is not None:
            part = CompletionLogprobs()
        if not self.started:
            self.started = True
            if self.echo:
                text = self.prompt.text + text
                if part is not None:
                    self._prompt_logprobs(tok, part)
        if part is not None:
            for lp in delta.logprobs or []:
                self._logprob(tok, part, lp)
        if delta.finish_reason is not None:
            self.finish_reason = str(getattr(delta.finish_reason, "value", delta.finish_reason))
        self.text += text
        if part is not None and self.logprobs is not None:
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(self.logprobs, name).extend(getattr(part, name))
        if not text and delta.finish_reason is None and not (part and part.tokens):
            return None
        return CompletionChoice(index=0, text=text, logprobs=part, finish_reason=self.finish_reason)

    def _prompt_logprobs(self, tok: Tokenizer, part: CompletionLogprobs) -> None:
        offsets = _Offsets(0)
        for token_id in self.prompt.ids:
            part.tokens.append(token_str(tok, token_id))
            part.token_logprobs.append(None)
            part.top_logprobs.append(None)
            part.text_offset.append(offsets.next(tok.token_bytes(token_id)))

    def _logprob(self, tok: Tokenizer, part: CompletionLogprobs, lp: EngineLogprob) -> None:
        assert self.top_n is not None
        chosen = token_str(tok, lp.token_id)
        tops = {token_str(tok, t): v for t, v in lp.top[: self.top_n]}
        tops.setdefault(chosen, lp.logprob)  # "up to logprobs + 1" entries, as OpenAI
        part.tokens.append(chosen)
        part.token_logprobs.append(lp.logprob)
        part.top_logprobs.append(tops)
        part.text_offset.append(self.offsets.next(tok.token_bytes(lp.token_id)))


@dataclass
class TextCompletion:
    """One request in flight: an engine request (a serving ``EngineRun``) per prompt, and
    its choices, prompt-major."""

    id: str
    request: TextCompletionRequest
    tokenizer: Tokenizer
    prompts: list[Prompt]
    runs: list[EngineRun]
    choices: list[ChoiceState]
    version: str
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self) -> Usage:
        prompt = sum(len(p.ids) for p in self.prompts)
        out = sum(c.tokens for run in self.runs for c in run.candidates)
        return Usage(prompt_tokens=prompt, completion_tokens=out, total_tokens=prompt + out)

    def fingerprint(self) -> str:
        """The policy version that answered (the first prompt's; set from its deltas)."""
        return next((r.policy_version for r in self.runs if r.policy_version), self.version)


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def _prompts(req: TextCompletionRequest, tok: Tokenizer) -> list[Prompt]:
    """Every prompt of the request as ids and text; 400 naming ``prompt`` for an empty one or
    a token id outside the vocabulary."""
    p = req.prompt
    items: list[str | list[int]]
    if isinstance(p, str):
        items = [p]
    elif p and isinstance(p[0], int):  # the schema makes a list all ids or all not
        items = [cast(list[int], p)]
    else:
        items = cast(list[str | list[int]], list(p))
    if not items:
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    if len(items) > MAX_PROMPTS:
        raise APIError(
            400,
            f"at most {MAX_PROMPTS} prompts in one request, got {len(items)}",
            param="prompt",
            code="invalid_value",
        )
    out = []
    for i, item in enumerate(items):
        label = _label(i, len(items))
        if isinstance(item, str):
            prompt = Prompt(tok.encode(item), item)
        else:
            bad = [t for t in item if not 0 <= t < tok.vocab_size]
            if bad:
                raise APIError(
                    400,
                    f"{label}: token id {bad[0]} is outside this model's vocabulary of "
                    f"{tok.vocab_size}",
                    param="prompt",
                    code="invalid_value",
                )
            prompt = Prompt(list(item), tok.decode(item))
        if not prompt.ids:
            raise APIError(
                400,
                f"{label} must not be empty",
                param="prompt",
                code="invalid_value",
            )
        out.append(prompt)
    return out


def _label(i: int, count: int) -> str:
    return f"prompt[{i}]" if count > 1 else "prompt"


def _max_tokens(req: TextCompletionRequest, prompt: Prompt, label: str, context: int) -> int:
    """``max_tokens`` for one prompt (null: what the prompt leaves of the context); 400
    ``context_length_exceeded`` when the prompt and it do not fit the context."""
    size = len(prompt.ids)
    max_tokens = req.max_tokens or context - size
    total = size + max(max_tokens, 1)
    if total > context:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens, however you requested "
            f"{total} tokens ({size} in {label}; {max_tokens} for the "
            "completion). Please reduce your prompt; or completion length.",
            param="prompt" if size >= context else "max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


def _params(req: TextCompletionRequest, tok: Tokenizer, max_tokens: int) -> SamplingParams:
    return sampling_params(
        req, tok, max_tokens, logprobs=req.logprobs is not None, top_logprobs=req.logprobs or 0
    )


def prepare(state: AppState, req: TextCompletionRequest, who: Principal) -> TextCompletion:
    """Validate against the served policy and build one engine request per prompt
    (400/404/503 before any token is generated)."""
    refused = unsupported_reason(req)
    if refused is not None:
        name, message = refused
        code = "unknown_parameter" if name not in UNSUPPORTED else "unsupported_parameter"
        raise APIError(400, message, param=name, code=code)
    if req.model not in serving.served_models(state):  # 503 while no policy is loaded
        raise model_not_found(req.model)
    assert state.engine is not None  # served_models checked
    tok, context = serving.serving_policy(state.engine)
    prompts = _prompts(req, tok)
    params = [
        _params(req, tok, _max_tokens(req, p, _label(i, len(prompts)), context))
        for i, p in enumerate(prompts)
    ]
    cid = new_completion_id()
    runs = [
        EngineRun(
            id=f"{cid}-{i}",
            prompt_ids=p.ids,
            params=params[i],
            tokenizer=tok,
            candidates=[CandidateState() for _ in range(req.n)],
        )
        for i, p in enumerate(prompts)
    ]
    choices = [ChoiceState(p, req.echo, req.logprobs) for p in prompts for _ in range(req.n)]
    return TextCompletion(cid, req, tok, prompts, runs, choices, state.engine.version)


async def _deltas(
    state: AppState, runs: list[EngineRun]
) -> AsyncGenerator[tuple[int, EngineDelta], None]:
    """(prompt index, delta) of every prompt's engine request, run concurrently, as they
    come; the first error (a 429 among them) ends it. Leaving it cancels what still runs."""
    queue: asyncio.Queue[tuple[int, EngineDelta | Exception | None]] = asyncio.Queue()

    async def pump(i: int, run: EngineRun) -> None:
        try:
            async for delta in serving.run_engine(state, run):
                queue.put_nowait((i, delta))
        except Exception as e:  # handed to the consumer, which raises it
            queue.put_nowait((i, e))
        else:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, run)) for i, run in enumerate(runs)]
    running = len(tasks)
    try:
        while running:
            i, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()  # run_engine cancels its engine request on the way out
        await asyncio.gather(*tasks, return_exceptions=True)


def _piece(tc: TextCompletion, i: int, delta: EngineDelta) -> CompletionChoice | None:
    index = i * tc.request.n + delta.index
    piece = tc.choices[index].take(tc.tokenizer, delta)
    if piece is not None:
        piece.index = index
    return piece


async def complete(state: AppState, tc: TextCompletion) -> TextCompletionResponse:
    """Non-streaming: run every prompt to the end, answer."""
    async with aclosing(_deltas(state, tc.runs)) as deltas:
        async for i, delta in deltas:
            _piece(tc, i, delta)
    return TextCompletionResponse(
        id=tc.id,
        created=tc.created,
        model=tc.request.model,
        system_fingerprint=tc.fingerprint(),
        choices=[
            CompletionChoice(
                index=k, text=c.text, logprobs=c.logprobs, finish_reason=c.finish_reason
            )
            for k, c in enumerate(tc.choices)
        ],
        usage=tc.usage(),
    )


def _chunk(tc: TextCompletion, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
    return TextCompletionResponse(
        id=tc.id,
        created=tc.created,
        model=tc.request.model,
        system_fingerprint=tc.fingerprint(),
        choices=choices,
        usage=usage,
    ).model_dump_json()


async def stream_chunks(state: AppState, tc: TextCompletion) -> AsyncGenerator[str, None]:
    """Streaming: chunk JSON strings, then the usage chunk if asked; the caller adds
    ``[DONE]``. Nothing is handed out before every prompt's engine request answered once, so
    a full queue is an error before the first chunk (a 429, not a broken stream)."""
    include_usage = bool(tc.request.stream_options and tc.request.stream_options.include_usage)
    answered: set[int] = set()
    held: list[str] | None = []
    async with aclosing(_deltas(state, tc.runs)) as deltas:
        async for i, delta in deltas:
            piece = _piece(tc, i, delta)
            chunk = _chunk(tc, [piece]) if piece is not None else None
            if held is None:
                if chunk is not None:
                    yield chunk
                continue
            answered.add(i)
            if chunk is not None:
                held.append(chunk)
            if len(answered) == len(tc.runs):
                for chunk in held:
                    yield chunk
                held = None
    if include_usage:
        yield _chunk(tc, [], usage=tc.usage())
