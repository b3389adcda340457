"""The proxy core: everything that forwards, and nothing that enforces policy."""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from edge.proxy.forward import UPSTREAM_STATUS_SCOPE_KEY, HttpForwarder
from edge.proxy.upstream import Origin, UpstreamPool
from edge.proxy.websocket import WebSocketForwarder
from edge.settings import EdgeSettings

__all__ = ["UPSTREAM_STATUS_SCOPE_KEY", "Proxy"]


class Proxy:
    """Forwards HTTP exchanges and WebSocket sessions to the upstream."""

    def __init__(self, settings: EdgeSettings) -> None:
        origin = Origin.from_url(settings.upstream_url)
        self.pool = UpstreamPool(
            origin,
            size=settings.upstream_pool_size,
            connect_timeout=settings.upstream_connect_timeout,
            read_timeout=settings.upstream_read_timeout,
            idle_timeout=settings.upstream_idle_timeout,
        )
        self.http = HttpForwarder(self.pool, buffer_bytes=settings.request_buffer_bytes)
        self.websocket = WebSocketForwarder(
            origin,
            connect_timeout=settings.upstream_connect_timeout,
            max_message_bytes=settings.ws_max_message_bytes,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
