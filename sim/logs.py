"""The simulator's logging: the project's JSON lines on standard output, and one access line
per request. Every line logged while a request is handled carries the caller's
`X-Request-ID` (the app sends its own with each provider call), so a turn can be followed
from the edge's log through the app's to the simulator's."""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.ids import ACCEPTABLE_REQUEST_ID
from common.logs import log_config as common_log_config
from common.logs import request_id_var
from sim.pipeline import SimulatedAbort

access_logger = logging.getLogger("sim.access")


class DropSimulatedAborts(logging.Filter):
    """A connection cut on purpose (the `abort_after_bytes` fault) is not a crash: its
    access line says so, and the server's traceback for it is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, SimulatedAbort)


def log_config(level: str) -> dict[str, Any]:
    """The project's JSON lines (`common.logs`), less the tracebacks of deliberate aborts."""
    return common_log_config(level, {"drop_aborts": DropSimulatedAborts})


class AccessLog:
    """One line per request: method, path, status, milliseconds. The simulator's own
    `/_sim/` endpoints log at debug, so a test's set-up calls do not drown the provider calls."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 0

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        outcome = "complete"
        request_id = next((value for name, value in scope["headers"] if name == b"x-request-id"), None)
        token = request_id_var.set(
            request_id.decode("ascii") if request_id and ACCEPTABLE_REQUEST_ID.fullmatch(request_id) else None
        )
        try:
            await self.app(scope, receive, send_and_note)
        except SimulatedAbort:
            outcome = "aborted on purpose"
            raise
        except BaseException:
            outcome = "failed"
            raise
        finally:
            path: str = scope["path"]
            access_logger.log(
                logging.DEBUG if path.startswith("/_sim/") else logging.INFO,
                "%s %s %d",
                scope["method"],
                path,
                status,
                extra={
                    "method": scope["method"],
                    "path": path,
                    "status": status,
                    "duration_ms": round((time.monotonic() - started) * 1000, 1),
                    "outcome": outcome,
                },
            )
            request_id_var.reset(token)
