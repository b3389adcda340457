"""Size limits: request headers (431) and bodies (413), without buffering anything.

- Too many header fields, or more header bytes than allowed: 431. The client's own fields
  are counted, as the server measured them before any layer added or removed one.
- A declared `Content-Length` over the route's limit: 413 at once, before the body is read,
  so the server never sends `100 Continue` and the upstream never hears of the request.
- A chunked body is counted as it streams through; the moment it passes the limit, the
  proxy is told the client is gone (it closes the upstream exchange) and the client gets
  413. Either way the connection is closed after the answer rather than drained.

Each refusal names the limit it is over ("The request body is larger than 1,048,576 bytes.").

The body limit is `EDGE_MAX_BODY_BYTES`, or a route's `max_body_bytes` in the policy file.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge import errors
from edge.policy import RouteTable
from edge.scope import CLIENT_HEAD_EXTENSION

CLOSE = [(b"connection", b"close")]


class SizeLimitMiddleware:
    def __init__(
        self, app: ASGIApp, body_limits: RouteTable[int], max_header_count: int, max_header_bytes: int
    ) -> None:
        self.app = app
        self.body_limits = body_limits
        self.max_header_count = max_header_count
        self.max_header_bytes = max_header_bytes
        self.too_many_fields = errors.too_many_header_fields(max_header_count)
        self.too_many_bytes = errors.headers_too_large(max_header_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        declared_length = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared_length = value
            elif name == b"transfer-encoding":
                chunked = True
        client_head: dict[str, int] = scope["extensions"][CLIENT_HEAD_EXTENSION]
        if client_head["fields"] > self.max_header_count or client_head["bytes"] > self.max_header_bytes:
            error = self.too_many_fields if client_head["fields"] > self.max_header_count else self.too_many_bytes
            if scope["type"] == "websocket":
                await receive()  # websocket.connect
                await errors.deny_websocket(scope, send, error)
            else:
                await errors.send_error(scope, send, error, CLOSE)
            return
        if scope["type"] == "websocket" or (declared_length is None and not chunked):
            await self.app(scope, receive, send)  # no body
            return

        limit = self.body_limits.lookup(scope["method"], scope["path"])
        if declared_length is not None:
            if not declared_length.isdigit() or int(declared_length) > limit:
                await errors.send_error(scope, send, errors.payload_too_large(limit), CLOSE)
                return
            # The server enforces a declared length itself; nothing to count.
            await self.app(scope, receive, send)
            return

        received = 0
        exceeded = False
        response_started = False

        async def receive_counting() -> Message:
            nonlocal received, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    # To the proxy this is a client gone: it drops the upstream exchange.
                    return {"type": "http.disconnect"}
            return message

        async def send_tracking(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        await self.app(scope, receive_counting, send_tracking)
        if exceeded and not response_started:
            await errors.send_error(scope, send, errors.payload_too_large(limit), CLOSE)
