"""WebSocket chat: several generations at once on one socket, cancel, thumbs.

Client frames (JSON): ``{"type":"auth","api_key"}`` (if the key was not in the
``Authorization`` header or ``?api_key=``), ``{"type":"chat","request_id"?, ...chat params}``,
``{"type":"cancel","request_id"}``, ``{"type":"feedback","completion_id","choice_index","rating",
"reason"?}``, ``{"type":"labels","completion_id","choice_index","labels":[...],"note"?}``.
Server frames: ``{"type":"ready","user"}``, ``{"type":"delta","request_id","index",
"content"}``, ``{"type":"done","request_id","completion_id","conversation_id","policy_version",
"finish_reasons","usage"}``, ``{"type":"feedback"|"labels","ok":true,...}`` (with
``"queued":true`` when it was spooled while the database is away), ``{"type":"error",
"request_id"?, "error": {...OpenAI shape}}``. Closing the socket cancels its generations.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from server.api import serving, writes
from server.api.appliers import is_unavailable
from server.api.deps import authenticate, bearer_token, state_of
from server.api.protocol import APIError, ChatCompletionRequest, FeedbackRequest, LabelRequest
from server.api.spool import SpoolError
from shared import store
from shared.keys import Principal

try:  # what sending on a socket that is already closed raises (a plain RuntimeError before)
    from starlette.websockets import WebSocketDisconnected as SocketClosed
except ImportError:  # pragma: no cover - older starlette
    SocketClosed = RuntimeError  # type: ignore[misc, assignment]

log = logging.getLogger(__name__)
router = APIRouter()

MAX_FRAME_BYTES = 256 * 1024
ENDPOINT = "/v1/chat/ws"  # each chat on the socket is counted as one request under this name
CANCELLED = 499  # a chat the client stopped: counted as a client-side end, as nginx does


def _error(err: APIError, request_id: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", **err.body()}
    if request_id is not None:
        frame["request_id"] = request_id
    return frame


def _unavailable() -> APIError:
    return APIError(
        503,
        "the database is unavailable; retry shortly",
        type="service_unavailable",
        code="database_unavailable",
    )


def _validation_error(e: ValidationError) -> APIError:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    return APIError(
        400,
        f"{param}: {first.get('msg')}" if param else first.get("msg", "invalid"),
        param=param,
        code="invalid_value",
    )


class ChatSocket:
    def __init__(self, ws: WebSocket, principal: Principal) -> None:
        self.ws, self.principal = ws, principal
        self.state = state_of(ws)
        self.tasks: dict[str, asyncio.Task] = {}
        self.send_lock = asyncio.Lock()
        self.counter = 0

    async def send(self, frame: dict[str, Any]) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(frame))

    def count(self, status: int, err: APIError | None = None) -> None:
        code = None if err is None else err.code or err.type
        self.state.metrics.count(ENDPOINT, status, code)

    async def refuse(self, err: APIError, request_id: str) -> None:
        """A chat that ends in an error frame before or while generating."""
        self.count(err.status, err)
        await self.send(_error(err, request_id))

    async def handle(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "chat":
            await self.start_chat(frame)
        elif kind == "cancel":
            task = self.tasks.get(str(frame.get("request_id")))
            if task is None:
                await self.send(
                    _error(
                        APIError(404, "no such running request", param="request_id"),
                        frame.get("request_id"),
                    )
                )
            else:
                task.cancel()
        elif kind in ("feedback", "labels"):
            await self.feedback(kind, frame)
        else:
            await self.send(_error(APIError(400, f"unknown frame type {kind!r}", param="type")))

    async def start_chat(self, frame: dict[str, Any]) -> None:
        self.counter += 1
        request_id = str(frame.get("request_id") or f"ws-{self.counter}")
        if request_id in self.tasks:
            await self.send(
                _error(APIError(400, "request_id already running", param="request_id"), request_id)
            )
            return
        body = {k: v for k, v in frame.items() if k not in ("type", "request_id")}
        body.setdefault("model", serving.MODEL_ALIAS)
        try:
            req = ChatCompletionRequest.model_validate(body)
            self.state.check_rate(self.principal)
            completion = await serving.prepare(self.state, req, self.principal)
        except ValidationError as e:
            await self.refuse(_validation_error(e), request_id)
            return
        except APIError as e:
            await self.refuse(e, request_id)
            return
        task = asyncio.create_task(self.run_chat(request_id, completion))
        self.tasks[request_id] = task
        task.add_done_callback(lambda _: self.tasks.pop(request_id, None))

    async def run_chat(self, request_id: str, c: serving.Completion) -> None:
        deltas = serving.run_engine(self.state, c)
        try:
            async for delta in deltas:
                if delta.text:
                    await self.send(
                        {
                            "type": "delta",
                            "request_id": request_id,
                            "index": delta.index,
                            "content": delta.text,
                        }
                    )
        except asyncio.CancelledError:
            serving.log_in_background(self.state, c)
            self.count(CANCELLED, APIError(CANCELLED, "cancelled", code="cancelled"))
            with contextlib.suppress(Exception):
                await self.send(
                    {
                        "type": "done",
                        "request_id": request_id,
                        "completion_id": c.id,
                        "cancelled": True,
                        "policy_version": c.policy_version,
                        "finish_reasons": ["cancelled"] * len(c.candidates),
                        "usage": c.usage().model_dump(),
                    }
                )
            return
        except (WebSocketDisconnect, SocketClosed):
            # a delta could not be sent: the client vanished before the socket loop noticed
            serving.log_in_background(self.state, c)
            self.count(CANCELLED, APIError(CANCELLED, "client gone", code="client_closed"))
            await deltas.aclose()  # aborts the generation
            return
        except APIError as e:
            await self.refuse(e, request_id)
            return
        try:
            await serving.log_to_db(self.state, c)
        except Exception as e:  # the client must hear of it, not wait for a "done" forever
            log.exception("websocket chat %s could not be logged", request_id)
            err = (
                e if isinstance(e, APIError) else APIError(500, "internal error", type="api_error")
            )
            self.count(err.status, err)
            with contextlib.suppress(Exception):
                await self.send(_error(err, request_id))
            return
        self.count(200)
        await self.send(
            {
                "type": "done",
                "request_id": request_id,
                "completion_id": c.id,
                "conversation_id": c.conversation_id,
                "policy_version": c.policy_version,
                "finish_reasons": [cand.finish_reason for cand in c.candidates],
                "usage": c.usage().model_dump(),
            }
        )

    async def feedback(self, kind: str, frame: dict[str, Any]) -> None:
        """A thumb (``feedback``) or labels (``labels``) frame; answered with a frame of the
        same type."""
        fields = {k: v for k, v in frame.items() if k != "type"}
        try:
            if kind == "labels":
                labels = LabelRequest.model_validate(fields)
                row, _ = await writes.record_labels(self.state, self.principal, labels)
            else:
                body = FeedbackRequest.model_validate(fields)
                row, _ = await writes.record_feedback(self.state, self.principal, body)
        except ValidationError as e:
            await self.send(_error(_validation_error(e)))
            return
        except store.NotFound as e:
            await self.send(_error(APIError(404, str(e) or "not found", type="not_found_error")))
            return
        except store.Invalid as e:
            await self.send(_error(APIError(400, str(e))))
            return
        except Exception as e:
            if not (isinstance(e, SpoolError) or is_unavailable(e)):
                raise
            await self.send(_error(_unavailable()))
            return
        await self.send({"type": kind, "ok": True, **json.loads(json.dumps(row, default=str))})

    async def close(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)


async def _receive_json(ws: WebSocket) -> dict[str, Any] | None:
    """Next frame as a JSON object, or None (after telling the client) when it is not one."""
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
    text = message.get("text")
    if text is None:  # a binary frame
        await ws.send_text(
            json.dumps(_error(APIError(400, "binary frames are not supported: send JSON text")))
        )
        return None
    if len(text) > MAX_FRAME_BYTES:
        await ws.send_text(
            json.dumps(_error(APIError(413, "frame too large", code="frame_too_large")))
        )
        return None
    try:
        frame = json.loads(text)
    except json.JSONDecodeError as e:
        await ws.send_text(json.dumps(_error(APIError(400, f"frame is not JSON: {e.msg}"))))
        return None
    except (ValueError, RecursionError):  # an integer past 4300 digits, deep nesting
        await ws.send_text(
            json.dumps(_error(APIError(400, "frame is not usable JSON: number or nesting too big")))
        )
        return None
    if not isinstance(frame, dict):
        await ws.send_text(json.dumps(_error(APIError(400, "frame must be a JSON object"))))
        return None
    return frame


@router.websocket("/v1/chat/ws")
async def chat_ws(ws: WebSocket) -> None:
    state = state_of(ws)
    await ws.accept()
    key = bearer_token(ws.headers.get("authorization")) or ws.query_params.get("api_key")
    try:
        if key is None and state.auth:
            first = await _receive_json(ws)
            key = first.get("api_key") if first and first.get("type") == "auth" else None
            key = key if isinstance(key, str) else None
        try:
            principal = await authenticate(state, key)
        except APIError as e:
            await ws.send_text(json.dumps(_error(e)))
            await ws.close(code=4401)
            return
        sock = ChatSocket(ws, principal)
        await sock.send({"type": "ready", "user": principal.user_name})
        try:
            while True:
                frame = await _receive_json(ws)
                if frame is None:
                    continue
                try:  # every frame, like every REST request: a revoked key stops at once
                    await authenticate(state, key)
                except APIError as e:
                    await sock.send(_error(e, frame.get("request_id")))
                    if e.status == 401:
                        await ws.close(code=4401)
                        return
                    continue  # 503: the key cannot be checked now; the socket stays
                await sock.handle(frame)
        finally:
            await sock.close()
    except WebSocketDisconnect:
        return
    except UnicodeDecodeError:
        with contextlib.suppress(Exception):
            await ws.close(code=1007)
