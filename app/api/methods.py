"""Request methods, the same way on every route (RFC 9110 section 9).

- HEAD is answered wherever GET is - reply audio included - with the head the GET would
  get (its status and headers, `content-length` too) and no body. FastAPI's routes answer
  GET alone; this is the one place that changes.
- A method HTTP does not define and no route implements (WebDAV's PROPFIND, HTCPCP's
  BREW) is 501 `not_implemented` in the envelope, on any path. A defined method a route
  does not allow stays 405 with `Allow` (`app.api.errors`).
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response

# HTTP's own methods, not an application protocol's (WebDAV's): RFC 9110's, PATCH (RFC 5789)
# and QUERY (the HTTP working group's safe method with a body,
# draft-ietf-httpbis-safe-method-w-body).
DEFINED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY"})


class RequestMethods:
    """ASGI middleware; `implemented`: the methods the app's routes answer."""

    def __init__(self, app: ASGIApp, implemented: Iterable[str]) -> None:
        self.app = app
        self.known = DEFINED_METHODS | set(implemented)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        if method == "HEAD":
            await self._head(scope, receive, send)
        elif method not in self.known:
            refusal = error_response(501, "not_implemented", "This request method is not supported.")
            await refusal(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _head(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Routes the request as a GET and sends on the head of its response only; the
        server still sees a HEAD, and frames the response as one."""
        as_get = {**scope, "method": "GET"}

        async def head_only(message: Message) -> None:
            if message["type"] != "http.response.body":
                await send(message)
            elif not message.get("more_body", False):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await self.app(as_get, receive, head_only)
        finally:
            if "route" in as_get:  # what routing matched, for the server span (app.observability)
                scope["route"] = as_get["route"]
