"""CORS: an allow-list of origins, preflights answered at the edge, `Vary: Origin` always.

Origins are exact (`https://app.example.com`) or a subdomain pattern
(`https://*.example.com`: any depth of subdomain, never the bare domain); no regular
expressions. A preflight (OPTIONS with `Origin` and `Access-Control-Request-Method`)
is answered here: 204 with the allow headers, or 403 in the error envelope when the
origin, method or a requested header is not allowed. An OPTIONS without
`Access-Control-Request-Method` is an ordinary request and is forwarded. Other requests
from a disallowed origin are forwarded without CORS headers, so the browser withholds the
response. The upstream's own `Access-Control-*` headers are dropped: CORS is decided
here, once. A WebSocket upgrade from a disallowed origin is refused: browsers send no
preflight for WebSockets, so this is the only defence against cross-site WebSocket
hijacking; the edge's own origin is always allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge import errors
from edge.proxy.ingress import ForwardedRequest
from edge.scope import FORWARDED_SCOPE_KEY, Headers

# Always readable by a page on an allowed origin: ids and limits are for clients too.
ALWAYS_EXPOSED = ("X-Request-ID", "RateLimit", "RateLimit-Policy", "Retry-After")
VARY_ORIGIN = (b"vary", b"Origin")


class CorsMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        allow_origins: Sequence[str],
        allow_credentials: bool,
        allow_methods: Sequence[str],
        allow_headers: Sequence[str],
        expose_headers: Sequence[str],
        max_age: int,
    ) -> None:
        self.app = app
        self.allow_any_origin = "*" in allow_origins
        self.exact_origins = {origin.lower() for origin in allow_origins if "*" not in origin}
        self.subdomain_patterns = [_subdomain_pattern(origin) for origin in allow_origins if "*." in origin]
        self.allow_methods = frozenset(allow_methods)
        self.allow_headers = frozenset(header.lower() for header in allow_headers)

        exposed = list(dict.fromkeys([*ALWAYS_EXPOSED, *expose_headers]))
        self.simple_headers: Headers = [(b"access-control-expose-headers", ", ".join(exposed).encode())]
        self.preflight_headers: Headers = [
            (b"access-control-allow-methods", ", ".join(allow_methods).encode()),
            (b"access-control-max-age", str(max_age).encode()),
            (b"content-length", b"0"),
        ]
        if allow_credentials:
            self.simple_headers.append((b"access-control-allow-credentials", b"true"))
            self.preflight_headers.append((b"access-control-allow-credentials", b"true"))
        # With `*` and no credentials the answer is the same for every origin.
        self.vary: Headers = [] if self.allow_any_origin else [VARY_ORIGIN]

    def is_allowed_origin(self, origin: str) -> bool:
        if self.allow_any_origin:
            return True
        origin = origin.lower()
        if origin in self.exact_origins:
            return True
        if not self.subdomain_patterns:
            return False
        parts = urlsplit(origin)
        host = parts.hostname or ""
        return any(
            parts.scheme == scheme and parts.port == port and host.endswith(suffix) and len(host) > len(suffix)
            for scheme, suffix, port in self.subdomain_patterns
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        origin = request_method = None
        requested_headers = b""
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"access-control-request-method":
                request_method = value.decode("latin-1")
            elif name == b"access-control-request-headers":
                requested_headers = value

        if origin is not None and request_method is not None and scope["method"] == "OPTIONS":
            await self.preflight(scope, send, origin, request_method, requested_headers)
            return
        added = [*self.vary]
        if origin is not None and origin != "null" and self.is_allowed_origin(origin):
            allow_origin = b"*" if self.allow_any_origin else origin.encode("latin-1")
            added += [(b"access-control-allow-origin", allow_origin), *self.simple_headers]

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                # The edge is where CORS is decided: an upstream's own CORS headers would
                # duplicate its answer (browsers then refuse the response) or contradict it.
                headers = [
                    header for header in message.get("headers", ()) if not header[0].startswith(b"access-control-")
                ]
                message["headers"] = headers + added
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def preflight(
        self, scope: Scope, send: Send, origin: str, request_method: str, requested_headers: bytes
    ) -> None:
        requested = [header.strip() for header in requested_headers.split(b",") if header.strip()]
        if (
            origin == "null"
            or not self.is_allowed_origin(origin)
            or request_method not in self.allow_methods
            or any(header.lower().decode("latin-1") not in self.allow_headers for header in requested)
        ):
            await errors.send_error(scope, send, errors.CORS_FORBIDDEN, self.vary)
            return
        headers = [
            *self.vary,
            (b"access-control-allow-origin", b"*" if self.allow_any_origin else origin.encode("latin-1")),
            *self.preflight_headers,
        ]
        if requested:
            headers.append((b"access-control-allow-headers", b", ".join(requested)))
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"origin"), None)
        if origin is None or self.is_allowed_origin(origin) or _is_same_origin(scope, origin):
            await self.app(scope, receive, send)
            return
        await receive()  # websocket.connect
        await errors.deny_websocket(scope, send, errors.CORS_FORBIDDEN)


def _subdomain_pattern(origin: str) -> tuple[str, str, int | None]:
    parts = urlsplit(origin.lower())
    return parts.scheme, (parts.hostname or "")[1:], parts.port  # "*.example.com" -> ".example.com"


def _is_same_origin(scope: Scope, origin: str) -> bool:
    forwarded: ForwardedRequest = scope[FORWARDED_SCOPE_KEY]
    if forwarded.host is None:
        return False
    return origin.lower() == f"{forwarded.proto}://{forwarded.host.decode('latin-1')}".lower()
