"""A lean HTTP/1.1 client for the upstream: keep-alive connections with backpressure,
spread over every address the upstream's name resolves to.

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

The upstream's host, unless an IP address, is resolved to all its addresses (re-resolved
every `resolve_interval` and when an address fails), each with its own idle connections.
Each exchange goes to the least busy address in rotation, round-robin among equals; an
address whose connection is refused, times out, or closes before any byte of a response is
left out for `eject_time`, and never all at once (docs/proxy.md, "Several upstream
addresses").
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, cast
from urllib.parse import urlsplit

import httptools

from edge.scope import Headers

logger = logging.getLogger("edge.proxy")

BUFFER_HIGH = 256 * 1024

# How the upstream's host becomes its addresses: `resolve_host` (the system resolver) but
# in tests, which cannot make a name resolve to several addresses on a shared machine.
Resolve = Callable[[str, int], Awaitable[list[str]]]


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (the system resolver: /etc/hosts, then DNS)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(sockaddr[0]) for _, _, _, _, sockaddr in infos]


class UpstreamError(Exception):
    """The upstream could not complete the exchange."""

    def __init__(self, message: str, *, unreachable: UpstreamAddress | None = None) -> None:
        super().__init__(message)
        # Set when no connection to this address could be opened: nothing was sent.
        self.unreachable = unreachable


class UpstreamUnavailable(UpstreamError):
    """Refused, reset, closed early or spoke broken HTTP."""


class NoResponse(UpstreamUnavailable):
    """The connection closed before any byte of the response: the request may or may not
    have been acted on."""


class StaleConnection(NoResponse):
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


class UpstreamAddress:
    """One address of the upstream: its idle connections, how many are busy, and until
    when it is out of rotation."""

    __slots__ = ("ejected_until", "host", "idle", "in_use", "retired")

    def __init__(self, host: str) -> None:
        self.host = host
        self.idle: list[UpstreamConnection] = []
        self.in_use = 0
        self.ejected_until = 0.0
        self.retired = False

    def retire(self) -> None:
        """No longer resolved (a replica gone): idle connections close now, busy ones after
        their exchange."""
        self.retired = True
        for connection in self.idle:
            connection.abort()
        self.idle.clear()


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection; `start()` begins an exchange, reads follow."""

    def __init__(self, pool: UpstreamPool, address: UpstreamAddress) -> None:
        self._pool = pool
        self.address = address
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
            elif self._received_any:
                self._fail(UpstreamUnavailable("connection closed during the exchange"))
            else:
                self._closed_unanswered()
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
        if self.closed:
            self._closed_unanswered()  # closed between its connect and now

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

    def _closed_unanswered(self) -> None:
        if self.reused:
            self._fail(StaleConnection("reused connection closed"))
        elif self._error is None:
            # A new connection closed unanswered: the address is failing (a replica stopping,
            # or stopped). A reused one says nothing against it: the keep-alive race.
            self._fail(NoResponse("connection closed before the response"))
            self._pool.eject(self.address, "closed before the response")

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    @staticmethod
    def _time_out(waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(UpstreamTimeout("no progress from the upstream"))


class UpstreamPool:
    """Keep-alive connections to one origin, at most `size` open at a time over all its
    addresses."""

    def __init__(
        self,
        origin: Origin,
        *,
        size: int,
        connect_timeout: float,
        read_timeout: float,
        idle_timeout: float,
        eject_time: float,
        resolve_interval: float,
        resolve: Resolve = resolve_host,
    ) -> None:
        self.origin = origin
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.eject_time = eject_time
        self.resolve_interval = resolve_interval
        self._resolve = resolve
        self._in_use = 0
        self._slots = asyncio.Semaphore(size)
        self._ssl = ssl.create_default_context() if origin.scheme == "https" else None
        self._turn = 0
        # An IP address is its own and only address; a name is followed as it changes.
        self._addresses = [UpstreamAddress(origin.host)] if _is_ip_address(origin.host) else []
        self._follows_name = not self._addresses
        self._resolution: asyncio.Future[None] | None = None
        self._next_resolution: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> int:
        return sum(len(address.idle) for address in self._addresses)

    @property
    def in_use(self) -> int:
        return self._in_use

    async def acquire(self, avoid: Sequence[UpstreamAddress] = (), *, fresh: bool = False) -> UpstreamConnection:
        """A connection to the least busy address in rotation that is not in `avoid`: one of
        its idle connections, unless `fresh`, or a new one."""
        if self._slots.locked():
            try:
                await asyncio.wait_for(self._slots.acquire(), self.connect_timeout)
            except TimeoutError:
                raise PoolExhausted("no free upstream connection") from None
        else:
            await self._slots.acquire()
        self._in_use += 1
        address: UpstreamAddress | None = None
        try:
            address = self._pick(self._addresses or await self._resolved(), avoid)
            address.in_use += 1
            return (None if fresh else self._take_idle(address)) or await self._connect(address)
        except BaseException:
            if address is not None:
                address.in_use -= 1
            self._in_use -= 1
            self._slots.release()
            raise

    def release(self, connection: UpstreamConnection) -> None:
        """Return a connection after an exchange; anything not cleanly finished is closed."""
        connection.finish()
        address = connection.address
        address.in_use -= 1
        if connection.reusable and not address.retired:
            connection.idle_since = connection.loop.time()
            address.idle.append(connection)
        else:
            connection.abort()
        self._in_use -= 1
        self._slots.release()

    def forget(self, connection: UpstreamConnection) -> None:
        idle = connection.address.idle
        if connection in idle:
            idle.remove(connection)

    def has_address_besides(self, avoid: Sequence[UpstreamAddress]) -> bool:
        return any(address not in avoid for address in self._addresses)

    def eject(self, address: UpstreamAddress, failure: str) -> None:
        """Takes a failing address out of rotation for `eject_time` (passive health checking),
        and has the name resolved again: the replica may be gone for good."""
        now = time.monotonic()
        if address.ejected_until > now:
            return
        address.ejected_until = now + self.eject_time
        out = sum(known.ejected_until > now for known in self._addresses)
        logger.warning(
            "upstream address failing (%s): left out for %g s; %d of %d out%s",
            failure,
            self.eject_time,
            out,
            len(self._addresses),
            "; all are tried anyway" if out >= len(self._addresses) else "",
        )
        self._resolve_soon()

    async def check(self) -> Literal["up", "degraded", "down"]:
        """Whether new connections can be opened now (readiness): to every address `up`, to
        some `degraded`, to none `down`."""
        try:
            addresses = self._addresses or await self._resolved()
        except UpstreamError:
            return "down"
        answered = await asyncio.gather(*(self._answers(address) for address in addresses))
        if all(answered):
            return "up"
        return "degraded" if any(answered) else "down"

    def close(self) -> None:
        """Closes the idle connections and stops following the name."""
        for address in self._addresses:
            for connection in address.idle:
                connection.abort()
            address.idle.clear()
        self._follows_name = False
        if self._next_resolution is not None:
            self._next_resolution.cancel()
        if self._resolution is not None:
            self._resolution.cancel()

    def _pick(self, addresses: list[UpstreamAddress], avoid: Sequence[UpstreamAddress]) -> UpstreamAddress:
        if len(addresses) == 1 and not avoid:
            return addresses[0]  # the common case: nothing to choose
        candidates = [address for address in addresses if address not in avoid]
        if not candidates:
            raise UpstreamUnavailable("every upstream address failed")
        now = time.monotonic()
        # Never all out at once: when every candidate is out, all are tried (panic mode).
        in_rotation = [address for address in candidates if address.ejected_until <= now] or candidates
        # The least busy, round-robin among equals: a replica held by long turns gets fewer.
        count = len(in_rotation)
        start = self._turn % count
        self._turn += 1
        chosen = in_rotation[start]
        for step in range(1, count):
            address = in_rotation[(start + step) % count]
            if address.in_use < chosen.in_use:
                chosen = address
        return chosen

    def _take_idle(self, address: UpstreamAddress) -> UpstreamConnection | None:
        idle = address.idle
        while idle:
            # Most recently used first: the least likely to have been closed by the upstream.
            connection = idle.pop()
            if connection.closed or connection.loop.time() - connection.idle_since > self.idle_timeout:
                connection.abort()
                continue
            connection.reused = True
            return connection
        return None

    async def _connect(self, address: UpstreamAddress) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        origin = self.origin
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: UpstreamConnection(self, address),
                    address.host,
                    origin.port,
                    ssl=self._ssl,
                    server_hostname=origin.host if self._ssl else None,
                )
        except TimeoutError:
            self.eject(address, "connect timed out")
            raise UpstreamTimeout("connect timed out", unreachable=address) from None
        except OSError as exc:
            self.eject(address, "connect failed")
            raise UpstreamUnavailable("connect failed", unreachable=address) from exc
        address.ejected_until = 0.0  # it answers again
        return connection

    async def _answers(self, address: UpstreamAddress) -> bool:
        try:
            connection = await self._connect(address)
        except UpstreamError:
            return False
        connection.abort()
        return True

    # -- following the name ----------------------------------------------------------------

    async def _resolved(self) -> list[UpstreamAddress]:
        """The addresses once the name has been resolved (before the first exchange, or
        while it has never resolved)."""
        self._resolve_soon()
        if self._resolution is not None:
            await asyncio.shield(self._resolution)
        if not self._addresses:
            raise UpstreamUnavailable("the upstream name did not resolve")
        return self._addresses

    def _resolve_soon(self) -> None:
        """Resolves the name now, unless that is already under way."""
        if self._follows_name and (self._resolution is None or self._resolution.done()):
            if self._next_resolution is not None:
                self._next_resolution.cancel()
            self._resolution = asyncio.ensure_future(self._resolve_name())

    async def _resolve_name(self) -> None:
        try:
            async with asyncio.timeout(self.connect_timeout):
                hosts = await self._resolve(self.origin.host, self.origin.port)
        except (OSError, TimeoutError) as exc:
            hosts = []
            failure = "timed out" if isinstance(exc, TimeoutError) else "failed"
        else:
            failure = "gave no address"
        if hosts:
            self._follow(hosts)
        else:
            # Kept: an empty answer or a resolver hiccup must not take every address away.
            logger.warning("upstream name resolution %s; %d known addresses kept", failure, len(self._addresses))
        self._next_resolution = asyncio.get_running_loop().call_later(self.resolve_interval, self._resolve_soon)

    def _follow(self, hosts: list[str]) -> None:
        resolved = dict.fromkeys(hosts)
        known = {address.host: address for address in self._addresses}
        for address in self._addresses:
            if address.host not in resolved:
                address.retire()
        kept = [address for address in self._addresses if not address.retired]
        self._addresses = kept + [UpstreamAddress(host) for host in resolved if host not in known]


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
