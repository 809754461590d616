"""OpenAI's legacy text completions, ``POST /v1/completions`` (JSON or SSE); see
:mod:`server.api.text_completions`."""

from __future__ import annotations

from fastapi import APIRouter, Response

from server.api import text_completions
from server.api.completion_protocol import TextCompletionRequest
from server.api.deps import CurrentUser, State
from server.api.protocol import json_response
from server.api.sse import sse_response

router = APIRouter(prefix="/v1", tags=["completions"])


@router.post("/completions", response_model=None)
async def completions(body: TextCompletionRequest, state: State, user: CurrentUser) -> Response:
    completion = text_completions.prepare(state, body, user)
    if not body.stream:
        return json_response(await text_completions.complete(state, completion))

    # the first chunk is awaited before answering: a full queue is a 429, not a broken 200
    return await sse_response(text_completions.stream_chunks(state, completion))
