"""OpenAI-compatible chat completions (JSON or SSE) and the model list."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from sse_starlette.sse import EventSourceResponse

from server.api import serving
from server.api.deps import CurrentUser, State
from server.api.protocol import ChatCompletionRequest, ChatCompletionResponse, ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["chat"])


@router.get("/models")
async def list_models(state: State, _: CurrentUser) -> ModelList:
    created = int(state.started_at)
    return ModelList(data=[ModelCard(id=m, created=created) for m in serving.served_models(state)])


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, state: State, user: CurrentUser
) -> ChatCompletionResponse | EventSourceResponse:
    completion = serving.prepare_completion(state, body, user)
    await serving.check_continuation(state, completion)
    if not body.stream:
        return await serving.complete(state, completion)

    # Run the stream up to its first chunk before answering: that submits the request to the
    # engine, so a full queue is a real 429 (with Retry-After) instead of a 200 whose stream
    # breaks off.
    chunks = serving.stream_chunks(state, completion)
    try:
        first: str | None = await anext(chunks)
    except StopAsyncIteration:
        first = None

    async def events() -> AsyncIterator[dict[str, Any]]:
        try:
            if first is not None:
                yield {"data": first}
            async for chunk in chunks:
                yield {"data": chunk}
            yield {"data": "[DONE]"}
        finally:
            await chunks.aclose()

    return EventSourceResponse(events(), ping=15)
