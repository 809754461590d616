"""Every API error leaves in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.protocol import APIError
from server.api.spool import SpoolError, is_unavailable
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


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = tuple(first.get("loc", ()))
        message = first.get("msg", "invalid request")
        param = _param(loc)
        if param:
            message = f"{param}: {message}"
        return error_response(APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return error_response(APIError(404, str(exc) or "not found", type="not_found_error"))

    @app.exception_handler(Invalid)
    async def _invalid(_: Request, exc: Invalid) -> JSONResponse:
        return error_response(APIError(400, str(exc), code="invalid_value"))

    @app.exception_handler(SQLAlchemyError)
    @app.exception_handler(DatabaseError)
    @app.exception_handler(SpoolError)
    async def _database(_: Request, exc: Exception) -> JSONResponse:
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
                )
            )
        log.error("database error", exc_info=exc)
        return error_response(APIError(500, "internal server error", type="api_error"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _TYPES.get(exc.status_code, "api_error")
        return error_response(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(APIError(500, "internal server error", type="api_error"))
