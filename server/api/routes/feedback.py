"""Thumbs, rankings, and the admin export of feedback in TRL's dataset formats (JSONL)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from fastapi.concurrency import iterate_in_threadpool
from fastapi.responses import StreamingResponse

from server.api import writes
from server.api.deps import Admin, CurrentUser, State
from server.api.protocol import FeedbackRequest, LabelRequest, RankingRequest
from shared import feedback_reader
from shared.oasst_export import export_oasst

router = APIRouter(prefix="/v1", tags=["feedback"])

_EXPORTS = {
    "preference": feedback_reader.export_preference,
    "kto": feedback_reader.export_kto,
    "messages": feedback_reader.export_messages,
    "oasst": export_oasst,
}


@router.post("/feedback")
async def post_feedback(
    body: FeedbackRequest, state: State, user: CurrentUser, response: Response
) -> dict[str, Any]:
    """Store a thumb: 200 once committed; 202 with ``"queued": true`` once it is durably
    spooled while the database is away (see :mod:`server.api.writes`)."""
    return _stored("feedback", *await writes.record_feedback(state, user, body), response)


@router.post("/labels")
async def post_labels(
    body: LabelRequest, state: State, user: CurrentUser, response: Response
) -> dict[str, Any]:
    """Label an answer (harmful, untrue, ..., refusal_was_wrong) with an optional note: one
    vote per label; 200 once committed, 202 with ``"queued": true`` once spooled."""
    return _stored("labels", *await writes.record_labels(state, user, body), response)


@router.post("/rankings")
async def post_ranking(
    body: RankingRequest, state: State, user: CurrentUser, response: Response
) -> dict[str, Any]:
    """Store a ranking: 200 once committed, 202 with ``"queued": true`` once spooled."""
    return _stored("ranking", *await writes.record_ranking(state, user, body), response)


def _stored(kind: str, row: dict[str, Any], queued: bool, response: Response) -> dict[str, Any]:
    if queued:
        response.status_code = 202
    return {"object": kind, **row}


@router.get("/feedback/export")
async def export_feedback(
    state: State,
    _: Admin,
    format: Annotated[Literal["preference", "kto", "messages", "oasst"], Query()] = "preference",
) -> StreamingResponse:
    rows: Iterator[dict[str, Any]] = _EXPORTS[format](state.db)

    async def lines() -> AsyncIterator[str]:
        async for row in iterate_in_threadpool(rows):
            yield json.dumps(row, default=str) + "\n"

    return StreamingResponse(
        lines(),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="feedback-{format}.jsonl"'},
    )
