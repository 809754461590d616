"""Every API error leaves in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.appliers import is_unavailable
from server.api.protocol import APIError
from server.api.spool import SpoolError
from shared.db import DatabaseError
from shared.store import Invalid, NotFound

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_response(err: APIError, request: Request | None = None) -> JSONResponse:
    """The error in OpenAI's shape; with ``request``, its code (else its type) is noted for
    the request counter (:class:`server.api.metrics.CountRequests`)."""
    if request is not None:
        request.state.error_code = err.code or err.type
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = tuple(first.get("loc", ()))
        if first.get("type") == "json_invalid":  # loc is ("body", offset): not a parameter
            where = loc[1] if len(loc) > 1 else "?"
            reason = (first.get("ctx") or {}).get("error", "invalid JSON")
            message = f"could not parse the JSON body of the request: {reason} at character {where}"
            return error_response(APIError(400, message, code="invalid_json"), request)
        message = first.get("msg", "invalid request")
        param = _param(loc)
        if param:
            message = f"{param}: {message}"
        return error_response(APIError(400, message, param=param, code="invalid_value"), request)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        err = APIError(404, str(exc) or "not found", type="not_found_error")
        return error_response(err, request)

    @app.exception_handler(Invalid)
    async def _invalid(request: Request, exc: Invalid) -> JSONResponse:
        return error_response(APIError(400, str(exc), code="invalid_value"), request)

    @app.exception_handler(SQLAlchemyError)
    @app.exception_handler(DatabaseError)
    @app.exception_handler(SpoolError)
    async def _database(request: Request, exc: Exception) -> JSONResponse:
        """The database is away (and for writes, the spool could not take them either):
        503 with Retry-After, so clients retry; any other database error is a 500."""
        if isinstance(exc, SpoolError) or is_unavailable(exc):
            log.warning("database unavailable: %s", exc)
            return error_response(
                APIError(
                    503,
                    "the database is unavailable; retry shortly",
                    type="service_unavailable",
                    code="database_unavailable",
                    headers={"Retry-After": "2"},
                ),
                request,
            )
        log.error("database error", exc_info=exc)
        return error_response(APIError(500, "internal server error", type="api_error"), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _TYPES.get(exc.status_code, "api_error")
        return error_response(APIError(exc.status_code, str(exc.detail), type=kind), request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(APIError(500, "internal server error", type="api_error"), request)
