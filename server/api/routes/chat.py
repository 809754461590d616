"""OpenAI-compatible chat completions (JSON or SSE), the model list and model cards."""

from __future__ import annotations

from fastapi import APIRouter, Response

from server.api import serving
from server.api.deps import AppState, CurrentUser, State
from server.api.protocol import (
    APIError,
    ChatCompletionRequest,
    ModelCard,
    ModelList,
    json_response,
)
from server.api.sse import sse_response

router = APIRouter(prefix="/v1", tags=["chat"])


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"model {model!r} does not exist or is not served; see GET /v1/models",
        type="not_found_error",
        param="model",
        code="model_not_found",
    )


def _cards(state: AppState) -> list[ModelCard]:
    models = serving.served_models(state)  # 503 while no policy is loaded
    assert state.engine is not None  # served_models checked
    _, context = serving.serving_policy(state.engine)
    created, version = int(state.started_at), state.engine.version
    return [ModelCard(id=m, created=created, root=version, max_model_len=context) for m in models]


@router.get("/models")
async def list_models(state: State, _: CurrentUser) -> ModelList:
    return ModelList(data=_cards(state))


@router.get("/models/{model:path}")
async def retrieve_model(model: str, state: State, _: CurrentUser) -> ModelCard:
    for card in _cards(state):
        if card.id == model:
            return card
    raise model_not_found(model)


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, state: State, user: CurrentUser
) -> Response:
    completion = await serving.prepare(state, body, user)
    if not body.stream:
        return json_response(await serving.complete(state, completion))

    # the first chunk is awaited before answering: a full queue is a 429, not a broken 200
    return await sse_response(serving.stream_chunks(state, completion))
