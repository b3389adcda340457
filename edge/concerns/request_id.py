"""Request ids: one per request, passed upstream, echoed on every response, in every log line.

An incoming `X-Request-ID` is kept only if it is 1-128 characters of `[A-Za-z0-9._-]`
(anything else could inject into logs); otherwise, or when absent, a UUIDv7 is made:
time-ordered, so ids sort by arrival in logs and indexes.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.ids import ACCEPTABLE_REQUEST_ID, uuid7
from common.logs import request_id_var

HEADER = b"x-request-id"


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        incoming = [value for name, value in scope["headers"] if name == HEADER]
        request_id = incoming[0] if len(incoming) == 1 and ACCEPTABLE_REQUEST_ID.fullmatch(incoming[0]) else None
        if request_id is None:
            request_id = uuid7().encode("ascii")
            headers = [(name, value) for name, value in scope["headers"] if name != HEADER]
            headers.append((HEADER, request_id))
            scope["headers"] = headers
        echoed = (HEADER, request_id)

        async def send_with_request_id(message: Message) -> None:
            if message["type"] in (
                "http.response.start",
                "websocket.accept",
                "websocket.http.response.start",
            ):
                headers = [(name, value) for name, value in message.get("headers", ()) if name != HEADER]
                headers.append(echoed)
                message["headers"] = headers
            await send(message)

        token = request_id_var.set(request_id.decode("ascii"))
        try:
            await self.app(scope, receive, send_with_request_id)
        finally:
            request_id_var.reset(token)
