"""vLLM's ``POST /tokenize`` and ``POST /detokenize``, over the policy that serves new requests.

``/tokenize`` takes plain text (``prompt``), encoded as user text is (it never yields a control
token), or chat ``messages``, rendered with the chat template exactly as
``/v1/chat/completions`` renders them, so that ``count`` is the ``usage.prompt_tokens`` a chat
request with those messages reports. ``max_model_len`` is the context that a prompt and its
reply share. ``/detokenize`` turns ids back into text, control tokens shown as their markers
(``<|user|>``), as vLLM's does.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from server.api import serving
from server.api.deps import AppState, CurrentUser, State
from server.api.protocol import APIError, ChatMessage
from server.api.routes.chat import model_not_found
from shared.tokenizer import Tokenizer, apply_chat_template

router = APIRouter(tags=["tokenize"])


class TokenizeRequest(BaseModel):
    """Either of vLLM's two forms: ``{"prompt", "add_special_tokens"?}`` or ``{"messages",
    "add_generation_prompt"?}``. palmchat's tokenizers add no special tokens around plain
    text (there is no BOS), so ``add_special_tokens`` gives the same ids either way."""

    model_config = ConfigDict(extra="forbid")  # an unknown parameter is a 400 naming it

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = Field(
        None, description="with messages: end with the assistant's turn marker (default true)"
    )
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


_EXAMPLES: dict[str, Any] = {
    "prompt": {"summary": "plain text", "value": {"model": "palmchat", "prompt": "Hello!"}},
    "messages": {
        "summary": "chat messages, as /v1/chat/completions templates them",
        "value": {"model": "palmchat", "messages": [{"role": "user", "content": "Hello!"}]},
    },
}


def _serving_tokenizer(state: AppState, model: str | None) -> tuple[Tokenizer, int]:
    """Tokenizer and context of the served policy; 404 for a model that is not served."""
    served = serving.served_models(state)  # 503 while no policy is loaded
    if model is not None and model not in served:
        raise model_not_found(model)
    assert state.engine is not None  # served_models checked
    return serving.serving_policy(state.engine)


def _form_error(body: TokenizeRequest) -> tuple[str, str] | None:
    """(parameter, message) when the body mixes the two forms or has neither."""
    if (body.prompt is None) == (body.messages is None):
        return "prompt", "send either prompt (text) or messages (a chat), not both or neither"
    if body.prompt is not None and body.add_generation_prompt is not None:
        return "add_generation_prompt", "add_generation_prompt applies to messages, not prompt"
    return None


@router.post("/tokenize")
async def tokenize(
    body: Annotated[TokenizeRequest, Body(openapi_examples=_EXAMPLES)],
    state: State,
    _: CurrentUser,
) -> TokenizeResponse:
    refused = _form_error(body)
    if refused is not None:
        raise APIError(400, refused[1], param=refused[0], code="invalid_value")
    tok, context = _serving_tokenizer(state, body.model)
    if body.messages is not None:
        messages = serving.chat_messages(body.messages)
        generation_prompt = body.add_generation_prompt is not False
        ids = await run_in_threadpool(apply_chat_template, tok, messages, generation_prompt)
    else:
        assert body.prompt is not None  # _form_error checked
        ids = await run_in_threadpool(tok.encode, body.prompt)
    strs = None
    if body.return_token_strs:  # control tokens as their markers, others as their text
        strs = [tok.decode([i], skip_special_tokens=False) for i in ids]
    return TokenizeResponse(count=len(ids), max_model_len=context, tokens=ids, token_strs=strs)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, state: State, _: CurrentUser) -> DetokenizeResponse:
    tok, _context = _serving_tokenizer(state, body.model)
    for i, token_id in enumerate(body.tokens):
        if not 0 <= token_id < tok.vocab_size:
            raise APIError(
                400,
                f"tokens[{i}]: token id {token_id} is outside this model's vocabulary of "
                f"{tok.vocab_size}",
                param="tokens",
                code="invalid_value",
            )
    text = await run_in_threadpool(tok.decode, body.tokens, False)
    return DetokenizeResponse(prompt=text)
