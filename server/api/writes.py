"""Writes the API acknowledges: conversation log entries, thumbs and rankings.

Each goes through the app's :class:`~server.api.spool.WriteSpool`: committed to the database, or,
while the database is unavailable, fsynced into the spool under the data dir and replayed in
order once it is back. A caller answers 2xx only after one of the two happened; a queued
thumb or ranking is answered ``202`` with ``"queued": true`` (its row id is not known yet).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from fastapi.concurrency import run_in_threadpool

from server.api.appliers import APPLIERS, BATCH_APPLIERS, apply_many
from server.api.batching import GroupRunner
from server.api.deps import AppState
from server.api.protocol import FeedbackRequest, LabelRequest, RankingRequest
from server.api.spool import Written
from shared.keys import Principal


async def write(state: AppState, kind: str, args: Mapping[str, Any]) -> Written:
    """Commit or spool one write (off the event loop); conversation-log writes of concurrent
    requests go in one transaction (:class:`~server.api.batching.GroupRunner`)."""
    if kind in BATCH_APPLIERS:
        runner = state.write_groups.get(kind)
        if runner is None:
            runner = state.write_groups[kind] = GroupRunner(partial(_write_many, state, kind))
        return await runner(args)
    if state.spool is None:
        return Written(await run_in_threadpool(APPLIERS[kind], state.db, args))
    return await run_in_threadpool(state.spool.write, kind, args)


def _write_many(state: AppState, kind: str, calls: list[Mapping[str, Any]]) -> list[Any]:
    if state.spool is not None:
        return state.spool.write_many(kind, calls)
    results = apply_many(state.db, kind, calls)
    return [r if isinstance(r, Exception) else Written(r) for r in results]


def count_feedback(state: AppState, row: Mapping[str, Any]) -> None:
    state.metrics.feedback.labels(str(row["rating"]), row["policy_version"] or "unknown").inc()


def on_applied(state: AppState):
    """The spool's hook for writes that reached the database on replay."""

    def hook(kind: str, _args: Mapping[str, Any], result: Any) -> None:
        if kind == "feedback":
            count_feedback(state, result)

    return hook


async def record_feedback(
    state: AppState, user: Principal, body: FeedbackRequest
) -> tuple[dict[str, Any], bool]:
    """Store a thumb; return (the response fields, queued)."""
    row, queued = await _write_for(state, user, "feedback", body.model_dump())
    if not queued:
        count_feedback(state, row)
    return row, queued


async def record_labels(
    state: AppState, user: Principal, body: LabelRequest
) -> tuple[dict[str, Any], bool]:
    """Store labels on one answer; return (the response fields, queued)."""
    return await _write_for(state, user, "labels", body.model_dump())


async def record_ranking(
    state: AppState, user: Principal, body: RankingRequest
) -> tuple[dict[str, Any], bool]:
    """Store a ranking; return (the response fields, queued)."""
    return await _write_for(state, user, "ranking", body.model_dump())


async def _write_for(
    state: AppState, user: Principal, kind: str, fields: dict[str, Any]
) -> tuple[dict[str, Any], bool]:
    """Write ``fields`` as ``user``; (the stored row, False), or (the fields, True) with
    ``"queued": true`` when the write was spooled."""
    written = await write(state, kind, {"user_id": user.user_id, **fields})
    if written.queued:
        return fields | {"queued": True}, True
    return written.result, False
