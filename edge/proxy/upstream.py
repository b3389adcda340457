"""A lean HTTP/1.1 client for the one upstream: keep-alive connections with backpressure.

Chosen by measurement (docs/benchmarks.md): httpx's pool collapses under concurrency here
and aiohttp costs about three times as much per request as an `asyncio.Protocol` fed
straight into httptools' C parser. The client does only what a reverse proxy needs:

- one exchange at a time per connection, no pipelining, no cookies, no redirects, no
  decompression: bytes and headers pass through as they are;
- response bodies are buffered at most `BUFFER_HIGH` bytes per connection; past that the
  socket stops being read until the client has taken the data (flat memory at any size);
- connections idle longer than the idle timeout are closed instead of reused, so the
  upstream's own keep-alive expiry does not race with a new request;
- a connection is reused only when its request was sent completely (`end_request`) and
  its response read completely, with not a byte more: a second response, trailers or
  stray bytes close it. Conflicting framing (both `Content-Length` and
  `Transfer-Encoding`, two lengths) is refused by the parser, and a transfer coding other
  than chunked, which the edge could not pass on faithfully, is refused here: the
  forwarder answers 502.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Literal, cast
from urllib.parse import urlsplit

import httptools

from edge.scope import Headers

BUFFER_HIGH = 256 * 1024


class UpstreamError(Exception):
    """The upstream could not complete the exchange."""


class UpstreamUnavailable(UpstreamError):
    """Refused, reset, closed early or spoke broken HTTP."""


class StaleConnection(UpstreamUnavailable):
    """A reused keep-alive connection closed before any byte of the response arrived."""


class UpstreamTimeout(UpstreamError):
    """No connection, or no progress, within the configured time."""


class PoolExhausted(UpstreamError):
    """Every connection the pool may open is busy."""


class _Unexpected(Exception):
    """Stops the parser at a byte the exchange cannot account for."""


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int
    path_prefix: bytes
    authority: bytes

    @classmethod
    def from_url(cls, url: str) -> Origin:
        parts = urlsplit(url)
        scheme = parts.scheme
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        return cls(
            scheme=scheme,
            host=host,
            port=port,
            path_prefix=parts.path.rstrip("/").encode("ascii"),
            authority=parts.netloc.encode("ascii"),
        )


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection; `start()` begins an exchange, reads follow."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        # Kept: asyncio.get_running_loop() costs a getpid() system call each time.
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._exchange_active = False
        self._request_sent = False
        self._waiter: asyncio.Future[None] | None = None
        self._wait_timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reset_exchange(head_request=False)

    def _reset_exchange(self, *, head_request: bool) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._head_request = head_request
        self._status = 0
        self._headers: Headers = []
        self._informational = False
        self._framed = False
        self._announces_body = False
        self._head_done = False
        self._complete = False
        self._keep_alive = False
        self._received_any = False
        self._error: UpstreamError | None = None
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._read_paused = False

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if not self._exchange_active:
            # An idle connection must stay silent; anything else is a broken upstream.
            self.abort()
            return
        self._received_any = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # HttpParserUpgrade: a 101 nobody asked for (WebSockets have their own client).
            unexpected = isinstance(exc, httptools.HttpParserCallbackError) and isinstance(exc.__context__, _Unexpected)
            self._fail(UpstreamUnavailable(str(exc.__context__) if unexpected else "malformed response"))
            self.abort()
            return
        if self._buffered > BUFFER_HIGH and not self._read_paused and self.transport:
            self._read_paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        if self._exchange_active and not self._complete:
            if self._head_done and not self._framed and not self._head_request:
                self._complete = True  # a body delimited by the end of the connection
            elif self.reused and not self._received_any:
                self._fail(StaleConnection("reused connection closed"))
            else:
                self._fail(UpstreamUnavailable("connection closed during the exchange"))
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            # One request, one response: a second one would be merged into the first.
            raise _Unexpected("bytes after the response")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            return  # a trailer field: never merged into the response head
        name = name.lower()
        if name == b"content-length" or name == b"transfer-encoding":
            self._framed = True
            self._announces_body = self._announces_body or name == b"transfer-encoding" or value.strip() != b"0"
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # 100 Continue, 103 Early Hints: not forwarded; the final response follows.
            self._informational = True
            self._headers = []
            self._framed = self._announces_body = False
            return
        codings = [value for name, value in self._headers if name == b"transfer-encoding"]
        if codings and b",".join(codings).strip().lower() != b"chunked":
            raise _Unexpected("a transfer coding other than chunked")
        self._status = status
        self._head_done = True
        if self._head_request:
            self._complete = True  # no body follows a HEAD response, whatever it declares
            # The parser cannot be told this answers a HEAD: were a broken upstream to send
            # the body it announces, it would arrive as the next exchange's response. Only a
            # HEAD response that announces no body leaves the connection reusable.
            self._keep_alive = self._parser.should_keep_alive() and not self._announces_body
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._complete:
            raise _Unexpected("a body after a HEAD response")
        self._body.append(body)
        self._buffered += len(body)
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._complete = True
        # Read now: llhttp forgets it once the message is over.
        self._keep_alive = self._parser.should_keep_alive()
        self._wake()

    # -- the exchange ----------------------------------------------------------------------

    def start(self, *, head_request: bool) -> None:
        self._reset_exchange(head_request=head_request)
        self._exchange_active = True
        self._request_sent = False

    def end_request(self) -> None:
        """The whole request is written; from now on the upstream's silence is timed."""
        self._request_sent = True
        waiter = self._waiter
        if waiter is not None and self._wait_timer is None:
            self._wait_timer = self.loop.call_later(self._pool.read_timeout, self._time_out, waiter)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the upstream has taken what was written (backpressure)."""
        if self._write_paused and not self.closed:
            self._drain_waiter = self.loop.create_future()
            handle = self.loop.call_later(self._pool.read_timeout, self._time_out, self._drain_waiter)
            try:
                await self._drain_waiter
            finally:
                handle.cancel()
                self._drain_waiter = None

    async def read_head(self) -> tuple[int, Headers]:
        while True:
            # An error wins over a head that came with it (a second response behind it).
            if self._error is not None:
                raise self._error
            if self._head_done:
                return self._status, self._headers
            await self._wait()

    async def read_body(self) -> tuple[bytes, bool]:
        """The next part of the body and whether more may follow."""
        while not self._body:
            if self._complete:
                return b"", False
            if self._error is not None:
                raise self._error
            await self._wait()
        chunk = self._body.popleft() if len(self._body) == 1 else b"".join(self._body)
        self._body.clear()
        self._buffered = 0
        if self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()
        return chunk, not self._complete

    @property
    def reusable(self) -> bool:
        return self._request_sent and self._complete and self._keep_alive and self._error is None and not self.closed

    def finish(self) -> None:
        self._exchange_active = False

    def abort(self) -> None:
        """Close at once (RST), whatever the state; used on every unclean ending."""
        if self._exchange_active and not self._complete:
            # Closed by the edge (the client went, or was too slow): never taken for a stale
            # keep-alive connection, which would send the request again.
            self._fail(UpstreamUnavailable("closed by the edge"))
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- waiting -------------------------------------------------------------------------

    async def _wait(self) -> None:
        waiter = self._waiter = self.loop.create_future()
        # While the request is still being sent, the client's pace sets the time (the
        # server's body timeouts bound it); the read timeout starts once it is all sent.
        if self._request_sent:
            self._wait_timer = self.loop.call_later(self._pool.read_timeout, self._time_out, waiter)
        try:
            await waiter
        finally:
            if self._wait_timer is not None:
                self._wait_timer.cancel()
                self._wait_timer = None
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    @staticmethod
    def _time_out(waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(UpstreamTimeout("no progress from the upstream"))


class UpstreamPool:
    """Keep-alive connections to one origin, at most `size` open at a time."""

    def __init__(
        self,
        origin: Origin,
        *,
        size: int,
        connect_timeout: float,
        read_timeout: float,
        idle_timeout: float,
    ) -> None:
        self.origin = origin
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self._idle: list[UpstreamConnection] = []
        self._in_use = 0
        self._slots = asyncio.Semaphore(size)
        self._ssl = ssl.create_default_context() if origin.scheme == "https" else None

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def in_use(self) -> int:
        return self._in_use

    async def acquire(self) -> UpstreamConnection:
        if self._slots.locked():
            try:
                await asyncio.wait_for(self._slots.acquire(), self.connect_timeout)
            except TimeoutError:
                raise PoolExhausted("no free upstream connection") from None
        else:
            await self._slots.acquire()
        self._in_use += 1
        try:
            return self._take_idle() or await self._connect()
        except BaseException:
            self._in_use -= 1
            self._slots.release()
            raise

    def release(self, connection: UpstreamConnection) -> None:
        """Return a connection after an exchange; anything not cleanly finished is closed."""
        connection.finish()
        if connection.reusable:
            connection.idle_since = connection.loop.time()
            self._idle.append(connection)
        else:
            connection.abort()
        self._in_use -= 1
        self._slots.release()

    def forget(self, connection: UpstreamConnection) -> None:
        if connection in self._idle:
            self._idle.remove(connection)

    async def check(self) -> Literal["up", "down"]:
        """Whether a new connection can be opened now (readiness)."""
        try:
            connection = await self._connect()
        except UpstreamError:
            return "down"
        connection.abort()
        return "up"

    def close(self) -> None:
        for connection in self._idle:
            connection.abort()
        self._idle.clear()

    def _take_idle(self) -> UpstreamConnection | None:
        while self._idle:
            # Most recently used first: the least likely to have been closed by the upstream.
            connection = self._idle.pop()
            if connection.closed or connection.loop.time() - connection.idle_since > self.idle_timeout:
                connection.abort()
                continue
            connection.reused = True
            return connection
        return None

    async def _connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        origin = self.origin
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: UpstreamConnection(self),
                    origin.host,
                    origin.port,
                    ssl=self._ssl,
                    server_hostname=origin.host if self._ssl else None,
                )
        except TimeoutError:
            raise UpstreamTimeout("connect timed out") from None
        except OSError as exc:
            raise UpstreamUnavailable("connect failed") from exc
        return connection
