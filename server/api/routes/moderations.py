"""OpenAI-compatible ``POST /v1/moderations``: the serving moderation classifier's verdicts."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from server.api.deps import CurrentUser, State
from server.api.moderation import ModerationUnavailable
from server.api.protocol import APIError
from shared.moderation import CATEGORIES

router = APIRouter(prefix="/v1", tags=["moderation"])

MODEL = "palmchat-moderation"
# OpenAI's model names are accepted too, so a client written for OpenAI works unchanged
ALIASES = ("omni-moderation-latest", "omni-moderation-2024-09-26", "text-moderation-latest",
           "text-moderation-stable")  # fmt: skip
MAX_INPUTS = 256
MAX_CHARS = 32_000  # per input


class TextInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ImageInput(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["image_url"]


class ModerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str | list[str] | list[TextInput | ImageInput]
    model: str | None = None


class ModerationResult(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[str]]


class ModerationResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationResult]


def _texts(body: ModerationRequest) -> list[str]:
    items: list[Any] = [body.input] if isinstance(body.input, str) else list(body.input)
    if not items:
        raise APIError(400, "input must not be empty", param="input", code="invalid_value")
    if len(items) > MAX_INPUTS:
        raise APIError(
            400, f"input has {len(items)} items; at most {MAX_INPUTS}", param="input",
            code="array_above_max_length",
        )  # fmt: skip
    texts = []
    for i, item in enumerate(items):
        if isinstance(item, ImageInput):
            raise APIError(
                400, "image inputs are not supported; send text", param=f"input.{i}",
                code="unsupported_value",
            )  # fmt: skip
        text = item.text if isinstance(item, TextInput) else item
        if not text.strip():
            raise APIError(400, f"input[{i}] is empty", param=f"input.{i}", code="invalid_value")
        if len(text) > MAX_CHARS:
            raise APIError(
                400, f"input[{i}] has {len(text)} characters; at most {MAX_CHARS}",
                param=f"input.{i}", code="string_above_max_length",
            )  # fmt: skip
        texts.append(text)
    return texts


@router.post("/moderations")
async def create_moderation(
    body: ModerationRequest, state: State, _: CurrentUser
) -> ModerationResponse:
    if (
        body.model is not None
        and body.model not in (MODEL, *ALIASES)
        and not (body.model.startswith(MODEL + "-"))
    ):
        raise APIError(
            404,
            f"moderation model {body.model!r} does not exist; use {MODEL!r}",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )
    texts = _texts(body)
    hook = state.moderation
    try:
        if hook is None:
            raise ModerationUnavailable("moderation is not configured")
        verdicts = await hook.classify(texts)
        version = hook.moderator.version if hook.moderator is not None else ""
    except ModerationUnavailable as e:
        raise APIError(
            503,
            f"moderation is unavailable: {e}",
            type="service_unavailable",
            code="moderation_unavailable",
            headers={"Retry-After": "5"},
        ) from None
    applied = {c: ["text"] for c in CATEGORIES}
    return ModerationResponse(
        id=f"modr-{uuid.uuid4().hex}",
        model=f"{MODEL}-{version}"
        if version and not version.startswith(MODEL)
        else version or MODEL,
        results=[
            ModerationResult(
                flagged=v.flagged,
                categories=v.categories,
                category_scores=v.category_scores,
                category_applied_input_types=applied,
            )
            for v in verdicts
        ],
    )
