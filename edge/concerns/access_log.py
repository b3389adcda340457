"""Access log: one JSON line per request, written when the exchange ends.

Fields: method, path (without the query, which may carry secrets, and with what policy
rules mark `redact` shown as `{redacted}`, so capability ids stay out of logs), status (499
when the client left before any response), bytes in and out, duration, the client address
as resolved through trusted proxies, the upstream's status (absent when the edge answered
itself), the rate-limit decision, and the upstream's `Server-Timing` when it sent one (the
app's turn stages: docs/metrics.md#timing); the formatter adds time, request id and trace id.
The edge's own `/_edge/` probes are logged at debug level, so health checks do not
drown the log.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge.policy import PathRedactor
from edge.scope import RATE_LIMIT_DECISION_SCOPE_KEY, UPSTREAM_STATUS_SCOPE_KEY, is_edge_path

logger = logging.getLogger("edge.access")

CLIENT_CLOSED_REQUEST = 499  # nginx's convention: no response was sent
SERVER_TIMING_LOGGED = 512  # bytes of an upstream's Server-Timing kept in the line


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, redact: PathRedactor) -> None:
        self.app = app
        self.redact = redact

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        bytes_in = bytes_out = 0
        status = CLIENT_CLOSED_REQUEST
        server_timing: str | None = None

        async def receive_counting() -> Message:
            nonlocal bytes_in
            message = await receive()
            if message["type"] == "http.request":
                bytes_in += len(message.get("body", b""))
            elif message["type"] == "websocket.receive":
                bytes_in += len(message.get("bytes") or b"") + len((message.get("text") or "").encode())
            return message

        async def send_counting(message: Message) -> None:
            nonlocal bytes_out, status, server_timing
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start"):
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name == b"server-timing":
                        server_timing = value[:SERVER_TIMING_LOGGED].decode("latin-1")
            elif kind in ("http.response.body", "websocket.http.response.body"):
                bytes_out += len(message.get("body", b""))
            elif kind == "websocket.accept":
                status = 101
            elif kind == "websocket.send":
                bytes_out += len(message.get("bytes") or b"") + len((message.get("text") or "").encode())
            await send(message)

        try:
            await self.app(scope, receive_counting, send_counting)
        finally:
            level = logging.DEBUG if is_edge_path(scope["path"]) else logging.INFO
            if logger.isEnabledFor(level):
                client = scope.get("client")
                method = scope.get("method", "GET")
                path = self.redact(method, scope["path"])
                logger.log(
                    level,
                    "%s %s %s",
                    scope.get("method", "WEBSOCKET"),
                    path,
                    status,
                    extra={
                        "method": method,
                        "path": path,
                        "status": status,
                        "bytes_in": bytes_in,
                        "bytes_out": bytes_out,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                        "client": client[0] if client else None,
                        "upstream_status": scope.get(UPSTREAM_STATUS_SCOPE_KEY),
                        "rate_limit": scope.get(RATE_LIMIT_DECISION_SCOPE_KEY),
                        **({"server_timing": server_timing} if server_timing is not None else {}),
                    },
                )
