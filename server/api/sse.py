"""The SSE response both completion routes stream: run the chunks up to the first before
answering, so that a full engine queue is a real 429 (with Retry-After) instead of a 200 whose
stream breaks off; then every chunk as an event, ``[DONE]`` last."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from sse_starlette.sse import EventSourceResponse

PING_SECONDS = 15  # a comment line keeps proxies from closing a quiet stream


async def sse_response(chunks: AsyncGenerator[str, None]) -> EventSourceResponse:
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

    return EventSourceResponse(events(), ping=PING_SECONDS)
