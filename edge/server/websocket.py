"""uvicorn's WebSocket protocol, for the sessions the edge's HTTP protocol hands over."""

from __future__ import annotations

from collections.abc import Callable

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from edge.scope import CLIENT_HEAD_EXTENSION


class EdgeWebSocketProtocol(WebSocketsSansIOProtocol):
    """Three additions:

    - a denial response completes the handshake: without this, every upgrade refused with
      an HTTP response (CORS, rate limit, an upstream's 401) logs a false "returned without
      completing handshake" error;
    - the session stays counted against its client's open connections until it ends;
    - the scope says how large the client's head was, as for HTTP requests.
    """

    release_client: Callable[[], None] | None = None
    client_head: dict[str, int] | None = None

    async def run_asgi(self) -> None:
        if self.client_head is not None:
            extensions: dict[str, object] = self.scope["extensions"]  # type: ignore[assignment]
            extensions[CLIENT_HEAD_EXTENSION] = self.client_head
        await super().run_asgi()

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            self.handshake_complete = True

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.release_client is not None:
            self.release_client()
            self.release_client = None
