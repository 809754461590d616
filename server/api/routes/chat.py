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
    created = int(state.extras.get("started_at", 0))
    return ModelList(data=[ModelCard(id=m, created=created) for m in serving.served_models(state)])


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, state: State, user: CurrentUser
) -> ChatCompletionResponse | EventSourceResponse:
    completion = serving.prepare_completion(state, body, user)
    if not body.stream:
        return await serving.complete(state, completion)

    async def events() -> AsyncIterator[dict[str, Any]]:
        async for chunk in serving.stream_chunks(state, completion):
            yield {"data": chunk}
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), ping=15)
