"""Policy versions: list with feedback stats; activate and roll back, and canary rollouts:
start one beside the active version, promote or abort it (admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from server.api.deps import Admin, AppState, CurrentUser, State
from server.api.protocol import APIError
from shared import policies
from shared.checkpoints import CheckpointError
from shared.keys import Principal
from shared.rollout import state as rollout

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


class CanaryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    share: float = Field(gt=0, lt=1, description="Share of users served the canary.")


class DecisionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("", max_length=2000, description="Why, recorded with the decision.")


def _canary_body(canary: rollout.Canary) -> dict[str, Any]:
    return {
        "object": "policy.canary",
        "version": canary.version,
        "share": canary.share,
        "started_at": canary.started_at,
    }


@router.post("/{version}/canary")
async def start_canary(version: str, body: CanaryRequest, state: State, _: Admin) -> dict[str, Any]:
    """Serve ``version`` to ``share`` of users beside the active version (sticky per user);
    again with another share to change it."""
    try:
        canary = await run_in_threadpool(
            rollout.start_canary, state.db, state.registry, version, body.share
        )
    except CheckpointError as e:
        raise APIError(409, f"refused: {e}", code="policy_verification_failed") from None
    await _after_change(state)
    return _canary_body(canary)


def _decision(who: Principal, body: DecisionRequest | None) -> dict[str, Any]:
    return {"by": f"admin:{who.user_name}", "reason": body.reason if body else ""}


@router.post("/{version}/promote")
async def promote(
    version: str, state: State, who: Admin, body: DecisionRequest | None = None
) -> dict[str, Any]:
    """End the canary of ``version`` by making it the active version."""
    previous = await run_in_threadpool(
        rollout.promote_canary, state.db, version, _decision(who, body)
    )
    await _after_change(state)
    return {"object": "policy.activation", "active": version, "previous": previous}


@router.post("/{version}/abort")
async def abort(
    version: str, state: State, who: Admin, body: DecisionRequest | None = None
) -> dict[str, Any]:
    """End the canary of ``version``: it is rejected, every user gets the active version."""
    await run_in_threadpool(rollout.abort_canary, state.db, version, _decision(who, body))
    await _after_change(state)
    return {"object": "policy.canary", "version": version, "status": "rejected"}
