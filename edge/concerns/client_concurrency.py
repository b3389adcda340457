"""Concurrent exchanges per client: no one client can hold the upstream pool.

A client (the address resolved through `EDGE_TRUSTED_PROXIES`) may have at most
`EDGE_MAX_EXCHANGES_PER_CLIENT` requests in flight through the edge; one more is answered
429 with `Retry-After: 1` ("Retry in 1 second.") at once, before its body is read. nginx's `limit_conn` is the
model. The edge's own `/_edge/` endpoints are not counted. See docs/edge.md.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from edge import errors
from edge.scope import is_edge_path

# An exchange in flight usually ends within a second; a client told to wait longer would
# wait for nothing.
RETRY_AFTER_SECONDS = 1
REFUSAL = errors.too_many_concurrent_requests(RETRY_AFTER_SECONDS)
RETRY_AFTER = [(b"retry-after", str(RETRY_AFTER_SECONDS).encode())]


class ClientConcurrencyMiddleware:
    def __init__(self, app: ASGIApp, max_exchanges: int) -> None:
        self.app = app
        self.max_exchanges = max_exchanges
        self._in_flight: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_edge_path(scope["path"]):
            await self.app(scope, receive, send)
            return

        client = scope["client"][0] if scope.get("client") else ""
        count = self._in_flight.get(client, 0)
        if count >= self.max_exchanges:
            await errors.send_error(scope, send, REFUSAL, RETRY_AFTER)
            return
        self._in_flight[client] = count + 1
        try:
            await self.app(scope, receive, send)
        finally:
            remaining = self._in_flight.pop(client) - 1
            if remaining:
                self._in_flight[client] = remaining
