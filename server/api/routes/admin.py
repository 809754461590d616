"""Admin search of the conversation log by the chat requests' ``user`` field (OpenAI's
end-user id), e.g. to review what one end user of an integration was answered."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from server.api.deps import Admin, State
from shared.db import session
from shared.schema import Message

router = APIRouter(prefix="/v1/admin", tags=["admin"])

FIELDS = ("id", "conversation_id", "completion_id", "choice_index", "content", "policy_version",
          "finish_reason", "moderation", "end_user", "created_at")  # fmt: skip


def answers_to(db: Engine, end_user: str, limit: int, before: int | None) -> list[dict[str, Any]]:
    """The newest answers given to ``end_user``, newest first (page with ``before`` = the last
    id of the previous page)."""
    query = select(Message).where(Message.end_user == end_user, Message.role == "assistant")
    if before is not None:
        query = query.where(col(Message.id) < before)
    with session(db) as s:
        rows = s.exec(query.order_by(col(Message.id).desc()).limit(limit)).all()
        return [{f: getattr(m, f) for f in FIELDS} for m in rows]


@router.get("/messages")
async def search_messages(
    state: State,
    _: Admin,
    end_user: Annotated[str, Query(min_length=1, max_length=256)],
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,  # an id column holds it
) -> dict[str, Any]:
    if "\x00" in end_user:  # no stored id has one, and PostgreSQL refuses it in a parameter
        return {"object": "list", "data": []}
    data = await run_in_threadpool(answers_to, state.db, end_user, limit, before)
    return {"object": "list", "data": data}
