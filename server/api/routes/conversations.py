"""The caller's own conversation log: list, read, delete (404 for anyone else's)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.concurrency import run_in_threadpool

from server.api.deps import CurrentUser, State
from server.api.protocol import APIError
from shared import store

router = APIRouter(prefix="/v1/conversations", tags=["conversations"])


@router.get("")
async def list_conversations(
    state: State,
    user: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: datetime | None = None,
) -> dict[str, Any]:
    if before is not None:
        try:  # the log keeps UTC; a date at the calendar's edge may have no UTC equivalent
            before = before.astimezone(UTC) if before.tzinfo else before.replace(tzinfo=UTC)
        except OverflowError:
            raise APIError(400, "before: date out of range", param="before") from None
    rows = await run_in_threadpool(
        store.list_conversations, state.db, user.user_id, limit=limit, before=before
    )
    return {"object": "list", "data": rows}


@router.get("/{conversation_id}")
async def get_conversation(conversation_id: str, state: State, user: CurrentUser) -> dict[str, Any]:
    return await run_in_threadpool(store.get_conversation, state.db, user.user_id, conversation_id)


@router.delete("/{conversation_id}", status_code=204)
async def delete_conversation(conversation_id: str, state: State, user: CurrentUser) -> Response:
    await run_in_threadpool(store.delete_conversation, state.db, user.user_id, conversation_id)
    return Response(status_code=204)
