"""The proxy core: everything that forwards, and nothing that enforces policy."""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from edge.proxy.forward import HttpForwarder
from edge.proxy.upstream import Origin, Resolve, UpstreamPool, resolve_host
from edge.proxy.websocket import WebSocketForwarder

__all__ = ["Proxy", "Resolve", "resolve_host"]


class Proxy:
    """Forwards HTTP exchanges and WebSocket sessions to the upstream at `upstream_url`
    (docs/proxy.md says what each limit is for)."""

    def __init__(
        self,
        upstream_url: str,
        *,
        pool_size: int,
        connect_timeout: float,
        read_timeout: float,
        idle_timeout: float,
        eject_time: float,
        resolve_interval: float,
        max_tries: int,
        request_buffer_bytes: int,
        ws_max_message_bytes: int,
        resolve: Resolve = resolve_host,
    ) -> None:
        origin = Origin.from_url(upstream_url)
        self.pool = UpstreamPool(
            origin,
            size=pool_size,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            idle_timeout=idle_timeout,
            eject_time=eject_time,
            resolve_interval=resolve_interval,
            resolve=resolve,
        )
        self.http = HttpForwarder(self.pool, buffer_bytes=request_buffer_bytes, max_tries=max_tries)
        self.websocket = WebSocketForwarder(
            origin, connect_timeout=connect_timeout, max_message_bytes=ws_max_message_bytes
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
