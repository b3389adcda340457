"""The edge's HTTP/1.1 server protocol: client bytes become an ASGI request only when they
can be read one way, and no client can hold the edge longer than the limits allow.

Per connection (docs/proxy.md, "Framing the edge can prove" and "Slow clients"):

- The head is parsed by llhttp (httptools) and judged by `request_head.read_head`; a
  refusal is answered in the error envelope, with the security headers and a request id,
  and the connection is closed. Nothing of a refused request reaches the application.
- Chunked trailer fields are dropped: they never become request headers.
- An `Upgrade` other than a WebSocket handshake is ignored (RFC 9110 section 7.8): the
  head is parsed again without it, so the body is framed like any other request's.
- Timeouts: the head must be complete `header_timeout` after accept (or after its first
  byte, on a kept-alive connection); an idle kept-alive connection is closed after
  `keep_alive_timeout`; the body must keep up `body_min_rate` with at most `body_timeout`
  of silence, or `receive()` raises `RequestBodyTimeout` (408); a client that takes no
  response data for `write_timeout` is cut off, which frees the upstream exchange.
- A response that starts before its request body was read completely ends the
  connection; the rest of the body is read and discarded for a short while first (a
  lingering close), so the client is not reset before it has read the answer.
- `send()` on a connection that is gone raises `ClientGone` (an `OSError`), as the ASGI
  spec asks, so a relay stops at once.

It runs under uvicorn 0.54.0, pinned: uvicorn's `Server` owns the socket, signals,
lifespan and drain. Beyond uvicorn's `Config`, this module relies on how uvicorn treats
its HTTP protocols - made per connection with `(config, server_state, app_state)`, kept in
`server_state.connections`, request tasks in `server_state.tasks`, `Date` in
`server_state.default_headers`, `shutdown()` called to drain - and hands WebSocket
handshakes to uvicorn's WebSocket protocol the way uvicorn's own HTTP protocols do.
tests/test_server_protocol.py fails when the pinned version changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Literal, cast

import httptools
from starlette.types import ASGIApp, Message
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl
from uvicorn.server import ServerState

from common.ids import ACCEPTABLE_REQUEST_ID, uuid7
from edge import errors
from edge.scope import CLIENT_HEAD_EXTENSION, EDGE_ERROR_SCOPE_KEY, Headers
from edge.server.metrics import DRAIN_REQUESTS, SERVER_REFUSALS
from edge.server.request_head import HeadRefused, RequestHead, read_head
from edge.server.websocket import EdgeWebSocketProtocol

if TYPE_CHECKING:
    from edge.server.config import EdgeServerConfig

logger = logging.getLogger("edge.server")

# Request body buffered per connection before the socket stops being read.
BODY_HIGH_WATER = 64 * 1024
# How long a closing connection reads and discards what the client still sends.
LINGER_S = 2.0

# What response field names and values may hold (RFC 9110 section 5): checked for a whole
# head at once, with `bytes.translate` deleting what is allowed, as a per-field regular
# expression cost more than the rest of writing the head.
TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
VALUE_CHARS = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
STATUS_LINES: dict[int, bytes] = {
    status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode()) for status in HTTPStatus
}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# llhttp's reasons (httptools 0.9.0) for versions it cannot parse, the HTTP/2 preface among
# them: answered 505 like the versions it parses and the rules refuse.
VERSION_ERRORS = frozenset({"Invalid HTTP version", "Pause on PRI/Upgrade"})
DISCONNECT: Message = {"type": "http.disconnect"}


class ClientGone(OSError):
    """`send()` after the client's connection was lost."""


class EdgeHttpProtocol(asyncio.Protocol):
    def __init__(
        self,
        config: EdgeServerConfig,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        self.config = config
        self.limits = config.limits
        self.app: ASGIApp = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.server_state = server_state
        self.app_state = app_state
        self.parser = httptools.HttpRequestParser(self)

        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int | None] | None = None
        self.scheme = "http"
        self._counted = False

        # The head being parsed.
        self._in_head = True  # between messages, or in a head: not in a body
        self._head_started = False
        self._head_bytes = 0
        self._target = b""
        self._fields: Headers = []
        self._field_bytes = 0
        self._refusal: errors.EdgeError | None = None
        self._upgrade: RequestHead | None = None
        self._websocket = False

        # The request being answered, those pipelined behind it, and whose body is parsed.
        self.cycle: RequestCycle | None = None
        self._queue: deque[RequestCycle] = deque()
        self._reading: RequestCycle | None = None

        self._read_paused = False
        self._write_paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._lingering = False
        self._shutting_down = False
        self._done_reading = False  # no further request will be read on this connection
        self._refusal_after_response: errors.EdgeError | None = None

        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_deadline = 0.0
        self._write_timer: asyncio.TimerHandle | None = None
        self._unsent_at_pause = 0

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server_state.connections.add(self)  # type: ignore[arg-type]
        self.client = get_remote_addr(self.transport)
        self.server = get_local_addr(self.transport)
        self.scheme = "https" if is_ssl(self.transport) else "http"
        if self.client is not None:
            if not self.config.clients.admit(self.client[0]):
                self.transport.abort()
                return
            self._counted = True
        # The first head is due within the head timeout of the accept: a connection that
        # never sends a byte is closed then.
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        self._release_client()
        for timer in (self._head_timer, self._idle_timer, self._body_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        for cycle in (self.cycle, *self._queue):
            if cycle is not None:
                cycle.lost()
        self._queue.clear()
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        if self._in_head:
            # Whole reads count, so body bytes right behind a head count too: the bound is
            # far above the largest head the size-limit layer admits; it only bounds memory.
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_head_bytes:
                self._refuse(errors.headers_too_large(self.limits.max_head_bytes))
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._take_upgrade(data[upgrade.args[0] :])
        except httptools.HttpParserError as exc:
            if self._refusal is None and isinstance(exc, httptools.HttpParserCallbackError):
                logger.error("request parsing failed", exc_info=exc.__context__)
            elif self._refusal is None and str(exc) in VERSION_ERRORS:
                self._refusal = errors.HTTP_VERSION_NOT_SUPPORTED
            self._refuse(self._refusal or errors.BAD_REQUEST)
        else:
            if self._head_started and self._head_timer is None and self.cycle is None:
                # A head begun in this read and not finished: due within the head timeout of
                # its first byte. (Most heads arrive whole, and need no timer at all.)
                self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)
            self._update_reading()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._writable.clear()
        self._unsent_at_pause = self.transport.get_write_buffer_size()
        self._write_timer = self.loop.call_later(self.limits.write_timeout, self._write_check)

    def resume_writing(self) -> None:
        self._write_paused = False
        self._writable.set()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    # -- parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_started = True
        self._target = b""
        self._fields = []
        self._field_bytes = 0
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def on_url(self, url: bytes) -> None:
        self._target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:
            # Whitespace around a value is not part of it (RFC 9112 section 5); llhttp
            # skips it in front only.
            value = value.rstrip(b" \t")
            self._fields.append((name.lower(), value))
            self._field_bytes += len(name) + len(value) + 4  # ": " and CRLF, as on the wire
        # else: a chunked trailer field, dropped - it must never pose as a header.

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_started = False
        self._head_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        try:
            head = read_head(self.parser.get_method(), self.parser.get_http_version(), self._target, self._fields)
        except HeadRefused as refused:
            self._refusal = refused.error
            raise
        if self.parser.should_upgrade():
            if self.cycle is not None:
                # Pipelined behind a request still being answered: nothing to hand over to.
                self._refusal = errors.BAD_REQUEST
                raise HeadRefused(errors.BAD_REQUEST)
            # llhttp skips the body of an upgrade request and hands back what follows.
            self._upgrade = head
            self._websocket = head.upgrade == b"websocket" and head.method == "GET" and head.framing == "none"
            return
        cycle = RequestCycle(self, head, self._scope(head))
        self._reading = cycle if head.framing != "none" else None
        if self.cycle is None:
            self._start(cycle)
        else:
            self._queue.append(cycle)

    def on_body(self, body: bytes) -> None:
        cycle = self._reading
        if cycle is None:
            return
        cycle.body += body
        if cycle is self.cycle and self._body_timer is not None:
            now = self.loop.time()
            credit = len(body) / self.limits.body_min_rate if self.limits.body_min_rate else self.limits.body_timeout
            self._body_deadline = min(max(self._body_deadline, now) + credit, now + self.limits.body_timeout)
        cycle.wake()

    def on_message_complete(self) -> None:
        cycle = self._reading
        self._in_head = True
        if cycle is None:
            return
        self._reading = None
        cycle.more_body = False
        self._stop_body_clock()
        cycle.wake()

    # -- requests --------------------------------------------------------------------------

    def _client_head(self) -> dict[str, int]:
        return {"fields": len(self._fields), "bytes": self._field_bytes}

    def _scope(self, head: RequestHead) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": head.http_version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "method": head.method,
            "root_path": "",
            "path": head.path,
            "raw_path": head.raw_path,
            "query_string": head.query_string,
            "headers": head.headers,
            "state": self.app_state.copy(),
            "extensions": {CLIENT_HEAD_EXTENSION: self._client_head()},
        }

    def _start(self, cycle: RequestCycle) -> None:
        self.cycle = cycle
        if cycle.more_body and not cycle.head.expect_continue:
            self._start_body_clock()
        task = self.loop.create_task(cycle.run(self.app))
        task.add_done_callback(self.server_state.tasks.discard)
        self.server_state.tasks.add(task)

    def response_started(self, cycle: RequestCycle) -> None:
        """Called as the response head is written: decides whether the connection stays."""
        if cycle.more_body or self._shutting_down:
            cycle.keep_alive = False

    def response_complete(self, cycle: RequestCycle) -> None:
        self.server_state.total_requests += 1
        if self._shutting_down:
            cut = cycle.scope.get(EDGE_ERROR_SCOPE_KEY) == errors.SHUTTING_DOWN.code
            DRAIN_REQUESTS.labels("cut" if cut else "completed").inc()
        self.cycle = None
        if self.transport.is_closing():
            return
        if not cycle.keep_alive:
            self._close(linger=cycle.more_body)
        elif self._queue:
            self._start(self._queue.popleft())
        elif self._refusal_after_response is not None:
            self._refuse(self._refusal_after_response)
        elif self._head_started:
            # Part of the next head has arrived: it is due from the end of this response.
            self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)
        else:
            self._idle_timer = self.loop.call_later(self.limits.keep_alive_timeout, self._close)
        self._update_reading()

    def shutdown(self) -> None:
        """uvicorn's drain: idle connections close now, busy ones after their response."""
        self._shutting_down = True
        if self.cycle is None:
            self._close()
            return
        DRAIN_REQUESTS.labels("in_flight").inc()
        if self._queue:
            DRAIN_REQUESTS.labels("dropped").inc(len(self._queue))
        self.cycle.keep_alive = False
        self._queue.clear()

    # -- upgrades ----------------------------------------------------------------------------

    def _take_upgrade(self, rest: bytes) -> None:
        head = self._upgrade
        assert head is not None
        self._upgrade = None
        if self._websocket:
            if rest:
                # A client must wait for the handshake's answer before it sends anything
                # (RFC 6455 section 4.1): these bytes are nobody's frames.
                self._refuse(errors.BAD_REQUEST)
                return
            self._hand_over_to_websocket(head)
            return
        # Not an upgrade the edge proxies: the same request without it, body and all.
        self.parser = httptools.HttpRequestParser(self)
        self.data_received(self._head_without_upgrade(head) + rest)

    def _head_without_upgrade(self, head: RequestHead) -> bytes:
        lines = [b"%s %s HTTP/%s\r\n" % (head.method.encode("ascii"), self._target, head.http_version.encode())]
        for name, value in self._fields:
            lowered = name.lower()
            if lowered == b"upgrade":
                continue
            if lowered == b"connection":
                tokens = [token for token in value.split(b",") if token.strip().lower() != b"upgrade"]
                if not any(token.strip() for token in tokens):
                    continue
                value = b",".join(tokens)
            lines += (name, b": ", value, b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def _hand_over_to_websocket(self, head: RequestHead) -> None:
        self.server_state.connections.discard(self)
        for timer in (self._head_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        lines = [b"GET ", self._target, b" HTTP/1.1\r\n"]
        for name, value in head.headers:
            lines += (name, b": ", value, b"\r\n")
        lines.append(b"\r\n")
        protocol = EdgeWebSocketProtocol(config=self.config, server_state=self.server_state, app_state=self.app_state)
        # The connection stays counted against its client until the session ends.
        release, self._counted = self._counted, False
        protocol.release_client = self._release_for(release)
        protocol.client_head = self._client_head()
        protocol.connection_made(self.transport)
        self.transport.set_protocol(protocol)
        protocol.data_received(b"".join(lines))

    # -- flow control and timers ---------------------------------------------------------------

    def _update_reading(self) -> None:
        """Reads the socket only while the edge wants more: no pipelined request waiting, no
        more body buffered than the application has taken."""
        if self._done_reading or self._lingering or self.transport.is_closing():
            return
        reading = self._reading
        pause = bool(self._queue) or (reading is not None and len(reading.body) > BODY_HIGH_WATER)
        if pause and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()
            self._stop_body_clock()
        elif not pause and self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()
            if reading is not None and reading is self.cycle and reading.clock_started:
                self._start_body_clock()

    def start_body_clock_on_continue(self, cycle: RequestCycle) -> None:
        if cycle is self.cycle and cycle.more_body and self._body_timer is None:
            self._start_body_clock()

    def _start_body_clock(self) -> None:
        assert self.cycle is not None
        self.cycle.clock_started = True
        self._body_deadline = self.loop.time() + self.limits.body_timeout
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_timer = self.loop.call_at(self._body_deadline, self._body_clock_check)

    def _stop_body_clock(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_clock_check(self) -> None:
        if self.loop.time() < self._body_deadline:
            self._body_timer = self.loop.call_at(self._body_deadline, self._body_clock_check)
            return
        self._body_timer = None
        cycle = self.cycle
        if cycle is None or not cycle.more_body:
            return
        logger.info("request body too slow", extra={"client": self.client[0] if self.client else None})
        self._stop_reading()
        cycle.body_timed_out()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is not None:
            return
        if self._head_started:
            self._refuse(errors.REQUEST_TIMEOUT)
        else:
            self._close()  # nothing was said: nothing to answer

    def _write_check(self) -> None:
        """Cuts a client that took less than the minimum rate's worth of the response data
        waiting for it in a write timeout (any at all, with no minimum rate)."""
        unsent = self.transport.get_write_buffer_size()
        taken = self._unsent_at_pause - unsent
        if taken > 0 and taken >= self.limits.body_min_rate * self.limits.write_timeout:
            self._unsent_at_pause = unsent  # it is reading, slowly enough: a new period starts
            self._write_timer = self.loop.call_later(self.limits.write_timeout, self._write_check)
            return
        self._write_timer = None
        logger.info("client stopped reading the response", extra={"client": self.client[0] if self.client else None})
        self.transport.abort()

    def _stop_reading(self, *, keep_queue: bool = False) -> None:
        """No further request is read on this connection; those read are answered if kept."""
        self._done_reading = True
        self._reading = None
        if not keep_queue:
            self._queue.clear()
        self._stop_body_clock()
        if not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()

    # -- refusals and closing ---------------------------------------------------------------------

    def _refuse(self, error: errors.EdgeError) -> None:
        """Answers `error` in the envelope and closes the connection."""
        SERVER_REFUSALS.labels(error.code).inc()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle is not self._reading:
                # Bytes behind the requests already read: refused once they are answered,
                # all but a pipelined one whose own body is what is broken.
                if self._reading is not None and self._reading in self._queue:
                    self._queue.remove(self._reading)
                self._refusal_after_response = error
                self._stop_reading(keep_queue=True)
                return
            # Its own body is broken: to the application the client is gone.
            cycle.lost()
            self.cycle = None
            if cycle.response_started:
                self.transport.abort()
                return
        self._refusal_after_response = None
        request_id = self._client_request_id() or uuid7()
        body = errors.error_body(error, request_id)
        headers = [
            *self.server_state.default_headers,
            *errors.error_headers(body),
            *self.limits.refusal_headers,
            (b"x-request-id", request_id.encode("ascii")),
            (b"connection", b"close"),
        ]
        content = [STATUS_LINES[error.status]]
        for name, value in headers:
            content += (name, b": ", value, b"\r\n")
        content += (b"\r\n", body)
        self.transport.write(b"".join(content))
        self._close(linger=True)
        logger.info(
            "request refused: %s",
            error.code,
            extra={"status": error.status, "request_id": request_id, "client": self.client[0] if self.client else None},
        )

    def _client_request_id(self) -> str | None:
        ids = [value for name, value in self._fields if name == b"x-request-id"]
        if len(ids) == 1 and ACCEPTABLE_REQUEST_ID.fullmatch(ids[0]):
            return ids[0].decode("ascii")
        return None

    def _close(self, *, linger: bool = False) -> None:
        if self.transport.is_closing():
            return
        if linger and self.transport.can_write_eof():
            # What the client still sends is read and dropped for a moment: closing with
            # unread data would reset the connection, and the client could lose the answer.
            self._lingering = True
            self.transport.write_eof()
            if self._read_paused and not self.transport.is_closing():
                self._read_paused = False
                self.transport.resume_reading()
            self.loop.call_later(LINGER_S, self.transport.close)
            return
        self.transport.close()

    def _release_client(self) -> None:
        if self._counted and self.client is not None:
            self._counted = False
            self.config.clients.release(self.client[0])

    def _release_for(self, counted: bool) -> Callable[[], None]:
        address = self.client[0] if self.client is not None else None
        clients = self.config.clients

        def release() -> None:
            if counted and address is not None:
                clients.release(address)

        return release

    async def drain(self) -> None:
        await self._writable.wait()


class RequestCycle:
    """One request: the ASGI `receive` and `send` of its application task."""

    __slots__ = (
        "_body_delivered",
        "_continue_owed",
        "_event",
        "_framing",
        "_remaining",
        "_timed_out",
        "_unsent_head",
        "body",
        "clock_started",
        "disconnected",
        "head",
        "keep_alive",
        "more_body",
        "protocol",
        "response_complete",
        "response_started",
        "scope",
        "transport",
    )

    def __init__(self, protocol: EdgeHttpProtocol, head: RequestHead, scope: dict[str, Any]) -> None:
        self.protocol = protocol
        self.head = head
        self.scope = scope
        self.transport = protocol.transport
        self.body = bytearray()
        self.more_body = head.framing != "none"
        self.clock_started = False
        self.keep_alive = head.keep_alive
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        self._continue_owed = head.expect_continue
        self._timed_out = False
        self._body_delivered = False
        self._event = asyncio.Event()
        self._framing: Literal["none", "length", "chunked", "close"] = "none"
        self._unsent_head = b""
        self._remaining = 0

    async def run(self, app: ASGIApp) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except ClientGone:
            pass
        except asyncio.CancelledError:
            # The drain timeout ran out: what was not answered whole is cut.
            if not self.response_complete:
                self.transport.abort()
            raise
        except BaseException:
            if not self.disconnected:
                logger.exception("the application failed")
            self._fail()
        else:
            if self.disconnected:
                return
            if not self.response_started:
                logger.error("the application returned without a response")
                self._fail()
            elif not self.response_complete:
                logger.error("the application returned without completing its response")
                self.transport.abort()

    def _fail(self) -> None:
        if self.response_started or self.disconnected:
            self.transport.abort()  # a half-sent response must not pass for a whole one
            return
        request_id = next((v for n, v in self.scope["headers"] if n == b"x-request-id"), b"").decode("latin-1")
        body = errors.error_body(errors.INTERNAL_ERROR, request_id or None)
        self.keep_alive = False
        self._write_head(500, [*errors.error_headers(body), *self.protocol.limits.refusal_headers])
        self._write_body(body, more_body=False)

    # -- receive -----------------------------------------------------------------------------------

    async def receive(self) -> Message:
        if self._continue_owed:
            self._continue_owed = False
            if not self.response_started and not self.transport.is_closing():
                self.transport.write(CONTINUE)
                self.protocol.start_body_clock_on_continue(self)
        while True:
            if self.disconnected or self.response_complete:
                return DISCONNECT
            if self._timed_out:
                raise errors.RequestBodyTimeout
            if self.body or (not self.more_body and not self._body_delivered):
                body = bytes(self.body)
                self.body.clear()
                self._body_delivered = not self.more_body
                self.protocol._update_reading()
                return {"type": "http.request", "body": body, "more_body": self.more_body}
            self._event.clear()
            await self._event.wait()

    def wake(self) -> None:
        self._event.set()

    def lost(self) -> None:
        self.disconnected = True
        self._event.set()

    def body_timed_out(self) -> None:
        self._timed_out = True
        self.keep_alive = False
        if self.response_started:
            self.transport.abort()
        self._event.set()

    # -- send ----------------------------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        if self.protocol.write_paused and not self.disconnected:
            await self.protocol.drain()
        if self.disconnected:
            raise ClientGone("the client's connection is gone")
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected http.response.start, got {kind}")
            self._write_head(message["status"], message.get("headers", []))
        elif not self.response_complete:
            if kind != "http.response.body":
                raise RuntimeError(f"expected http.response.body, got {kind}")
            self._write_body(message.get("body", b""), more_body=message.get("more_body", False))
        else:
            raise RuntimeError(f"{kind} after the response was complete")

    def _write_head(self, status: int, headers: Headers) -> None:
        if status not in STATUS_LINES or status < 200:
            raise RuntimeError(f"cannot send status {status}")
        self.protocol.response_started(self)
        content = [STATUS_LINES[status]]
        length: int | None = None
        chunked = False
        for name, value in [*self.protocol.server_state.default_headers, *headers]:
            name = name.lower()
            if name == b"content-length":
                if length is not None:
                    raise RuntimeError("two Content-Length fields in a response")
                length = int(value)
            elif name == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    raise RuntimeError("unsupported Transfer-Encoding in a response")
                chunked = True
                continue  # written below, when the framing is chunked
            elif name == b"connection":
                if b"close" in (token.strip().lower() for token in value.split(b",")):
                    self.keep_alive = False
                continue  # written once below
            content += (name, b": ", value, b"\r\n")
        if chunked and length is not None:
            raise RuntimeError("Content-Length and Transfer-Encoding in one response")
        names, values = content[1::4], content[3::4]  # [status line, name, ": ", value, CRLF, ...]
        if (
            b"".join(names).translate(None, TOKEN_CHARS)
            or b"".join(values).translate(None, VALUE_CHARS)
            or not all(names)
        ):
            raise RuntimeError("invalid response header")
        if self.head.method == "HEAD" or status in (204, 304):
            self._framing = "none"  # whatever the headers say, no body follows
        elif length is not None:
            self._framing = "length"
            self._remaining = length
        elif self.head.http_version == "1.1":
            self._framing = "chunked"
            content.append(b"transfer-encoding: chunked\r\n")
        else:
            self._framing = "close"  # HTTP/1.0 knows no chunking: the close ends the body
            self.keep_alive = False
        if not self.keep_alive:
            content.append(b"connection: close\r\n")
        content.append(b"\r\n")
        self.response_started = True
        self._continue_owed = False
        # Written with the first part of the body, one send instead of two, when that part
        # follows at once (a small response relayed whole); else on the loop's next turn.
        self._unsent_head = b"".join(content)
        self.protocol.loop.call_soon(self._flush_head)

    def _flush_head(self) -> None:
        if self._unsent_head and not self.transport.is_closing():
            self.transport.write(self._unsent_head)
        self._unsent_head = b""

    def _write_body(self, body: bytes, *, more_body: bool) -> None:
        framing = self._framing
        parts = [self._unsent_head] if self._unsent_head else []
        self._unsent_head = b""
        if framing == "chunked":
            if body:
                parts += (b"%x\r\n" % len(body), body, b"\r\n")
            if not more_body:
                parts.append(b"0\r\n\r\n")
        elif framing == "length":
            if len(body) > self._remaining:
                raise RuntimeError("response body longer than its Content-Length")
            self._remaining -= len(body)
            parts.append(body)
        elif framing == "close":
            parts.append(body)
        if parts:
            self.transport.write(parts[0] if len(parts) == 1 else b"".join(parts))
        if not more_body:
            if self._remaining:
                raise RuntimeError("response body shorter than its Content-Length")
            self.response_complete = True
            self._event.set()
            self.protocol.response_complete(self)
