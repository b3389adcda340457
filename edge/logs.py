"""The edge's logging set-up: the project's JSON lines (`common.logs`) on standard output."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from common.logs import log_config as common_log_config
from edge.proxy.forward import ResponseAborted


class DropAbortedResponses(logging.Filter):
    """The server logs deliberately cut requests as crashes, with a traceback each.

    A response cut short was already logged by the proxy with its reason; requests cut
    when the drain timeout ends were counted by the server's own shutdown message.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, ResponseAborted | asyncio.CancelledError)


def log_config(level: str) -> dict[str, Any]:
    return common_log_config(level, {"drop_aborted": DropAbortedResponses})
