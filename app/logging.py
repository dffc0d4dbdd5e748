"""Structured logs: one JSON object per line, naming the request they belong to; on a terminal, or with
``APP_LOG_FORMAT=text``, one human-readable line instead (``APP_LOG_FORMAT=json`` forces JSON).

The request ID is held in a context variable set by the request middleware, so any log line written while
handling a request (in the route, or in a thread started from it with ``asyncio.to_thread``) names it
without the ID being passed around. Fields passed as ``extra={...}`` become keys of the JSON object.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is logged as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_SERVICE_LOGGERS = ("app", "uvicorn", "uvicorn.error")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        current = request_id.get()
        if current is not None:
            entry["request_id"] = current
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``12:00:00.123 INFO    app.factory: message  key=value request_id=...``: the JSON's fields, for a person."""

    def format(self, record: logging.LogRecord) -> str:
        clock = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        fields = {key: value for key, value in vars(record).items() if key not in _STANDARD and not key.startswith("_")}
        if (current := request_id.get()) is not None:
            fields["request_id"] = current
        extra = "".join(f" {key}={_one_line(value)}" for key, value in fields.items())
        message = _one_line(record.getMessage())
        line = f"{clock} {record.levelname:<7} {record.name}: {message}{'  ' + extra if extra else ''}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _one_line(value: object) -> str:
    """``value`` with CR and LF escaped, so a request path (the client's) cannot forge a log line."""
    return str(value).replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def use_text(log_format: str, stream: object = sys.stderr) -> bool:
    if log_format == "auto":
        return bool(getattr(stream, "isatty", lambda: False)())
    return log_format == "text"


def configure_logging(level: str = "info", log_format: str = "auto") -> None:
    """Send the service's and uvicorn's logs to stderr, as JSON lines or (``use_text``) text lines. Idempotent.

    uvicorn's own access log is silenced: the request middleware writes one richer line per request.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if use_text(log_format, sys.stderr) else JsonFormatter())
    for name in _SERVICE_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    logging.getLogger("uvicorn.access").disabled = True
