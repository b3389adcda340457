"""JSON-lines logging for the edge: one object per line, on standard output.

Every line logged while a request is handled carries its `request_id` (set by the request
id layer) and `trace_id` (from the request's span), whatever logger wrote it.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson
from opentelemetry import trace

from edge.proxy.forward import ResponseAborted

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

# The JSON lines show no caller, thread or process, and looking them up costs more than
# the rest of a line (the logging HOWTO's "Optimization" section).
logging._srcfile = None
logging.logThreads = False
logging.logProcesses = False
logging.logMultiprocessing = False

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._second_text = ""

    def timestamp(self, created: float) -> str:
        """ISO 8601 in UTC with milliseconds; the part up to the second is formatted once."""
        second = int(created)
        if second != self._second:
            self._second = second
            self._second_text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._second_text}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            entry["request_id"] = request_id
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = format(span_context.trace_id, "032x")
            entry["span_id"] = format(span_context.span_id, "016x")
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES:
                entry[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        # orjson: a seventh of json.dumps's cost, and every request writes a line.
        return orjson.dumps(entry, default=str).decode()


class DropAbortedResponses(logging.Filter):
    """The server logs deliberately cut requests as crashes, with a traceback each.

    A response cut short was already logged by the proxy with its reason; requests cut
    when the drain timeout ends were counted by the server's own shutdown message.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, ResponseAborted | asyncio.CancelledError)


def log_config(level: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` document; uvicorn applies it in every worker process."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "filters": {"drop_aborted": {"()": DropAbortedResponses}},
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "filters": ["drop_aborted"],
                "stream": "ext://sys.stdout",
            }
        },
        "root": {"handlers": ["stdout"], "level": level.upper()},
        "loggers": {
            "uvicorn": {"level": level.upper()},
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": {"level": "WARNING", "propagate": False},
        },
    }
