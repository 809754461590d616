"""Policy versions: list with feedback stats; activate and roll back (admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from server.api.deps import Admin, AppState, CurrentUser, State
from server.api.protocol import APIError
from shared import policies
from shared.checkpoints import CheckpointError

router = APIRouter(prefix="/v1/policies", tags=["policies"])


@router.get("")
async def list_policies(state: State, _: CurrentUser) -> dict[str, Any]:
    rows = await run_in_threadpool(policies.list_policies, state.db, state.registry)
    return {"object": "list", "data": rows}


async def _after_change(state: AppState) -> None:
    """Let the serving side pick the change up now rather than at its next poll."""
    if state.on_policy_change is not None:
        await state.on_policy_change()


@router.post("/{version}/activate")
async def activate(version: str, state: State, _: Admin) -> dict[str, Any]:
    try:
        previous = await run_in_threadpool(policies.activate, state.db, state.registry, version)
    except CheckpointError as e:
        raise APIError(409, f"refused: {e}", code="policy_verification_failed") from None
    await _after_change(state)
    return {"object": "policy.activation", "active": version, "previous": previous}


@router.post("/rollback")
async def rollback(state: State, _: Admin) -> dict[str, Any]:
    old, new = await run_in_threadpool(policies.rollback, state.db, state.registry)
    await _after_change(state)
    return {"object": "policy.activation", "active": new, "previous": old}
