"""Concurrent exchanges per client: no one client can hold the upstream pool.

A client (the address resolved through `EDGE_TRUSTED_PROXIES`) may have at most
`EDGE_MAX_EXCHANGES_PER_CLIENT` requests in flight through the edge; one more is answered
429 with `Retry-After: 1` at once, before its body is read. nginx's `limit_conn` is the
model. The edge's own `/_edge/` endpoints are not counted. See docs/edge.md.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from edge import errors

EXEMPT_PREFIX = "/_edge/"
RETRY_AFTER = [(b"retry-after", b"1")]


class ClientConcurrencyMiddleware:
    def __init__(self, app: ASGIApp, max_exchanges: int) -> None:
        self.app = app
        self.max_exchanges = max_exchanges
        self._in_flight: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(EXEMPT_PREFIX):
            await self.app(scope, receive, send)
            return

        client = scope["client"][0] if scope.get("client") else ""
        count = self._in_flight.get(client, 0)
        if count >= self.max_exchanges:
            await errors.send_error(scope, send, errors.TOO_MANY_CONCURRENT_REQUESTS, RETRY_AFTER)
            return
        self._in_flight[client] = count + 1
        try:
            await self.app(scope, receive, send)
        finally:
            remaining = self._in_flight.pop(client) - 1
            if remaining:
                self._in_flight[client] = remaining
