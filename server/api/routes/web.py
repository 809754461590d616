"""The web page (``/``), the admin page (``/admin``) and their static files (``/static/...``).

Plain HTML, CSS and ES modules from ``server/web/``: no build step and no external CDN, so the
pages work on a machine without internet. Every API call the pages make carries the user's key;
these routes themselves need none (they hold no data).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from server.api.protocol import APIError

WEB_DIR = Path(__file__).resolve().parents[2] / "web"

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}
# The pages load only their own files; inline scripts, frames and other origins are refused.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        "style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _file(relative: str) -> FileResponse:
    root = WEB_DIR.resolve()
    try:
        path = (root / relative).resolve()
    except (OSError, ValueError):  # e.g. a NUL character in the name
        raise APIError(404, "not found", type="not_found_error") from None
    if not path.is_relative_to(root) or not path.is_file() or path.suffix not in _TYPES:
        raise APIError(404, "not found", type="not_found_error")
    return FileResponse(path, media_type=_TYPES[path.suffix], headers=_HEADERS)


@router.get("/")
async def index() -> FileResponse:
    return _file("index.html")


@router.get("/admin")
async def admin() -> FileResponse:
    return _file("admin.html")


@router.get("/static/{name:path}")
async def static(name: str) -> FileResponse:
    return _file(name)
