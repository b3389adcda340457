"""Runs the edge on uvicorn: one process or several workers, with a graceful drain."""

from __future__ import annotations

import asyncio
import logging
import signal
from http import HTTPStatus
from types import FrameType
from typing import Any

import uvicorn
from uvicorn._types import ASGI3Application, ASGISendEvent
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from common.ids import uuid7
from edge import errors
from edge.app import build_app
from edge.logs import log_config
from edge.policy import Policy
from edge.settings import EdgeSettings

# Body bytes that may arrive in the same reads as a request head (uvloop reads 256 KiB).
HEAD_READ_ALLOWANCE = 512 * 1024
DEFAULT_HEAD_LIMIT = 1024 * 1024

logger = logging.getLogger("edge.server")


class EdgeHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, made strict about what never reaches the application.

    - A request the parser refuses - both `Content-Length` and `Transfer-Encoding`, broken
      chunking, bad header syntax - is answered 400 in the error envelope. If its head was
      valid and only the body is broken, uvicorn has already created the request's task;
      that task is cancelled so the request is not forwarded (when the whole request
      arrived at once, the task has not run yet and nothing at all reaches the upstream).
    - A request head still incomplete after `config.h11_max_incomplete_event_size` bytes
      is answered 431 and the connection closed: the parser itself sets no bound, and an
      endless header line would otherwise grow the process's memory without limit. The
      finer limits on header count and size are the size-limit layer's, with a 431 that
      carries every edge header; this one only bounds memory.
    """

    _request_task: asyncio.Task[None] | None = None
    _head_bytes = 0
    _reading_head = True

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._head_limit = config.h11_max_incomplete_event_size or DEFAULT_HEAD_LIMIT

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # uvicorn keeps no per-connection handle on the task; this is its own code plus one.
        task = self._request_task = self.loop.create_task(cycle.run_asgi(app))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def data_received(self, data: bytes) -> None:
        if self._reading_head:
            # Counts whole reads, so body bytes right behind a head count too: the bound is
            # set well above the largest head the size-limit layer admits.
            self._head_bytes += len(data)
            if self._head_bytes > self._head_limit:
                self._refuse(errors.HEADERS_TOO_LARGE)
                return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._head_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._reading_head = True  # the next request on this connection starts with a head
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        self._refuse(errors.BAD_REQUEST)

    def _refuse(self, error: errors.EdgeError) -> None:
        cycle = self.cycle
        if cycle is not None and self._request_task is not None and not self._request_task.done():
            cycle.disconnected = True
            cycle.message_event.set()
            self._request_task.cancel()
            if cycle.response_started:
                self.transport.close()  # an error now would corrupt the response under way
                return
        request_id = uuid7()
        body = errors.error_body(error, request_id)
        content = [b"HTTP/1.1 %d %s\r\n" % (error.status, HTTPStatus(error.status).phrase.encode())]
        headers = [*errors.error_headers(body), (b"x-request-id", request_id.encode())]
        for name, value in [*self.server_state.default_headers, *headers]:
            content += (name, b": ", value, b"\r\n")
        content += (b"connection: close\r\n\r\n", body)
        self.transport.write(b"".join(content))
        self.transport.close()
        logger.info("request refused by the parser", extra={"status": error.status, "request_id": request_id})


class EdgeWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, aware that a denial response completes the handshake.

    Without this, every upgrade refused with an HTTP response (CORS, rate limit, an
    upstream's 401) logs a false "returned without completing handshake" error.
    """

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            self.handshake_complete = True


def uvicorn_options(settings: EdgeSettings) -> dict[str, Any]:
    return {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": EdgeHttpProtocol,
        "ws": EdgeWebSocketProtocol,
        "ws_max_size": settings.ws_max_message_bytes,
        "lifespan": "on",
        # The edge resolves clients itself, through EDGE_TRUSTED_PROXIES only.
        "proxy_headers": False,
        "server_header": False,
        "date_header": True,
        "access_log": False,
        "log_config": log_config(settings.log_level.value),
        "timeout_keep_alive": settings.client_keep_alive_timeout,
        # EdgeHttpProtocol's bound on an incomplete request head (see there).
        "h11_max_incomplete_event_size": settings.max_header_bytes + HEAD_READ_ALLOWANCE,
        "timeout_graceful_shutdown": settings.drain_timeout,
    }


def serve(settings: EdgeSettings, policy: Policy) -> None:
    options = uvicorn_options(settings)
    # uvicorn re-raises the signal that stopped it once it has drained; a handler of our
    # own turns that into a normal exit (status 0) instead of death by signal.
    signal.signal(signal.SIGTERM, _exit_quietly)
    signal.signal(signal.SIGINT, _exit_quietly)
    if settings.workers == 1:
        uvicorn.run(build_app(settings, policy), **options)
    else:
        uvicorn.run("edge.app:create_app", factory=True, workers=settings.workers, **options)


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    return None
