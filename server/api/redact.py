"""Keep API keys out of the server's logs.

uvicorn's access log and its WebSocket lines print the request path with its query string, and
the WebSocket takes its key as ``?api_key=`` (browsers cannot set headers there). A filter on
those loggers blanks the value before any handler formats the record.
"""

from __future__ import annotations

import logging
import re

_API_KEY_PARAM = re.compile(r"(?i)(api_key=)[^&\s\"']+")
LOGGERS = ("uvicorn.access", "uvicorn.error")


def redact(text: str) -> str:
    return _API_KEY_PARAM.sub(r"\1[redacted]", text)


class RedactKeys(logging.Filter):
    """Blanks ``api_key=`` values in a record's message and string arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            args = record.args.items()
            record.args = {k: redact(v) if isinstance(v, str) else v for k, v in args}
        return True


def install() -> None:
    """Add the filter to uvicorn's loggers (once; uvicorn's logging config keeps filters)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactKeys) for f in logger.filters):
            logger.addFilter(RedactKeys())
