"""The proxy core: forwards an HTTP exchange to the upstream unchanged, streaming.

Follow one request: `__call__` -> `_open_exchange` (a small body read first, so a slow
sender holds no upstream connection; the request head built by `_request_head`; a pooled
connection; a larger body pumped by `ClientSide` as it arrives; the response head awaited;
another try, on a new connection, when nothing was sent or the request can be sent again)
-> `Exchange.relay` (the response passed on chunk by chunk) -> `Exchange.close`.

Every failure before the response starts becomes an edge-made error in the project's
envelope; after it starts, the client's connection is cut so a truncated body is never
mistaken for a complete one. Whatever way the exchange ends - client gone, upstream gone,
an early response, a timeout, cancellation - the upstream connection goes back to the
pool only if its request was sent completely and its response read completely; otherwise
it is closed (docs/proxy.md, "Framing the edge can prove"). Which failures are tried
again, and where: docs/proxy.md, "Several upstream addresses".
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from typing import Literal

from starlette.types import Message, Receive, Scope, Send

from edge import errors
from edge.proxy.headers import RESPONSE_HOP_BY_HOP, removable_fields
from edge.proxy.ingress import ForwardedRequest
from edge.proxy.upstream import (
    NoResponse,
    PoolExhausted,
    StaleConnection,
    UpstreamAddress,
    UpstreamConnection,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from edge.scope import FORWARDED_SCOPE_KEY, UPSTREAM_STATUS_SCOPE_KEY, Headers

logger = logging.getLogger("edge.proxy")

# RFC 9110 section 9.2.2: sending one of these twice has the effect of sending it once.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
FRAMING_FIELDS = frozenset({b"content-length", b"transfer-encoding"})
CLOSE = [(b"connection", b"close")]

# Exchanges shorter than this end before a client's disconnect could matter; only longer
# ones pay for a task that watches the client. Under load, queueing alone makes every
# exchange last a few milliseconds, so the threshold sits well above that.
WATCH_CLIENT_AFTER = 0.05

Framing = Literal["length", "chunked"]


class ClientDisconnected(Exception):
    """The client went away before the exchange finished."""


class HttpForwarder:
    def __init__(self, pool: UpstreamPool, *, buffer_bytes: int, max_tries: int) -> None:
        self.pool = pool
        self.buffer_bytes = buffer_bytes
        self.max_tries = max_tries
        self._path_prefix = pool.origin.path_prefix
        self._default_host = pool.origin.authority

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            exchange = await self._open_exchange(scope, receive)
        except ClientDisconnected:
            return  # nobody is left to answer
        except errors.RequestBodyTimeout:
            await errors.send_error(scope, send, errors.REQUEST_TIMEOUT, CLOSE)
            return
        except PoolExhausted:
            await errors.send_error(scope, send, errors.UPSTREAM_BUSY, [(b"retry-after", b"1")])
            return
        except UpstreamTimeout:
            await errors.send_error(scope, send, errors.UPSTREAM_TIMEOUT)
            return
        except UpstreamUnavailable:
            await errors.send_error(scope, send, errors.UPSTREAM_UNAVAILABLE)
            return
        except asyncio.CancelledError:
            # Only the server cancels a request: when the drain ends.
            await errors.send_error(scope, send, errors.SHUTTING_DOWN, [(b"retry-after", b"1")])
            raise
        except OSError:
            raise  # the client's connection is gone; the server knows
        except Exception:
            # A defect of ours: logged in full, answered in the envelope, never leaked.
            logger.exception("proxy failure before the response started")
            await errors.send_error(scope, send, errors.INTERNAL_ERROR)
            return
        scope[UPSTREAM_STATUS_SCOPE_KEY] = exchange.status
        try:
            await exchange.relay(send)
        finally:
            exchange.close()

    def _request_head(self, scope: Scope, framing: bytes | None) -> bytes:
        """The request line and headers for the upstream, with exactly one framing field."""
        target = self._path_prefix + scope["raw_path"]
        if scope["query_string"]:
            target += b"?" + scope["query_string"]
        parts = [scope["method"].encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
        has_host = False
        for name, value in scope["headers"]:
            if name not in FRAMING_FIELDS:
                has_host = has_host or name == b"host"
                parts += (name, b": ", value, b"\r\n")
        if not has_host:
            # HTTP/1.0 may come without one; HTTP/1.1 towards the upstream needs one.
            parts += (b"host: ", self._default_host, b"\r\n")
        if framing is not None:
            parts.append(framing)
        forwarded: ForwardedRequest = scope[FORWARDED_SCOPE_KEY]
        for name, value in forwarded.upstream_headers():
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    async def _open_exchange(self, scope: Scope, receive: Receive) -> Exchange:
        """Sends the request and waits for the response head."""
        framing, declared_length = _client_framing(scope["headers"])
        prefix = b""
        complete = framing is None
        if framing is not None and self.buffer_bytes and (framing == "chunked" or declared_length <= self.buffer_bytes):
            # A small body is read before an upstream connection is taken: a client that
            # sends it slowly then holds only its own connection, never the pool's.
            prefix, complete = await _read_body(receive, self.buffer_bytes)
        if complete:
            framing_field = b"content-length: %d\r\n" % len(prefix) if framing is not None else None
        elif framing == "chunked":
            framing_field = b"transfer-encoding: chunked\r\n"
        else:
            framing_field = b"content-length: %d\r\n" % declared_length
        head = self._request_head(scope, framing_field)
        head_request = scope["method"] == "HEAD"
        # Only a request whose whole body is at hand can be sent again.
        resendable = complete and scope["method"] in IDEMPOTENT_METHODS
        avoid: list[UpstreamAddress] = []  # the addresses that failed this request
        tries = 1
        while True:
            try:
                connection = await self.pool.acquire(avoid, fresh=tries > 1)
            except UpstreamError as exc:
                # No connection, so nothing was sent: another address may be tried, whatever
                # the method (a stopped replica refuses before any byte of the request).
                if exc.unreachable is None:
                    raise
                avoid.append(exc.unreachable)
                if not self._may_try_again(tries, avoid):
                    raise
                tries += 1
                continue
            client: ClientSide | None = None
            try:
                connection.start(head_request=head_request)
                if complete:
                    connection.write(head + prefix)
                    connection.end_request()
                    client = ClientSide(receive, connection, pump=None)
                else:
                    connection.write(head)
                    if prefix:
                        connection.write(_frame(prefix, chunked=framing == "chunked"))
                    client = ClientSide(receive, connection, pump=framing)
                status, headers = await connection.read_head()
                return Exchange(self.pool, connection, client, status, headers)
            except NoResponse as exc:
                self._end(connection, client)
                if client is not None:
                    client.raise_failure()
                # The request may have been acted on: only one that may be sent twice is sent
                # again. A stale keep-alive connection says nothing against its address.
                if not isinstance(exc, StaleConnection):
                    avoid.append(connection.address)
                if not resendable or not self._may_try_again(tries, avoid):
                    raise
                tries += 1
            except UpstreamError:
                self._end(connection, client)
                if client is not None:
                    client.raise_failure()  # the client's side closed the connection, and why
                raise
            except BaseException:
                self._end(connection, client)
                raise

    def _may_try_again(self, tries: int, avoid: list[UpstreamAddress]) -> bool:
        return tries < self.max_tries and self.pool.has_address_besides(avoid)

    def _end(self, connection: UpstreamConnection, client: ClientSide | None) -> None:
        if client is not None:
            client.stop()
        self.pool.release(connection)


class Exchange:
    """An exchange whose response head has arrived: relays the response, then ends."""

    __slots__ = ("client", "connection", "headers", "pool", "status")

    def __init__(
        self,
        pool: UpstreamPool,
        connection: UpstreamConnection,
        client: ClientSide,
        status: int,
        headers: Headers,
    ) -> None:
        self.pool = pool
        self.connection = connection
        self.client = client
        self.status = status
        self.headers = headers

    async def relay(self, send: Send) -> None:
        try:
            dropped = removable_fields(self.headers, RESPONSE_HOP_BY_HOP)
            headers = [(name, value) for name, value in self.headers if name not in dropped]
            await send({"type": "http.response.start", "status": self.status, "headers": headers})
            more = True
            while more:
                body, more = await self.connection.read_body()
                await send({"type": "http.response.body", "body": body, "more_body": more})
        except OSError:
            return  # the client's connection is gone (ASGI servers raise OSError on send)
        except UpstreamError as exc:
            if self.client.gone:
                return
            logger.warning("response cut short: %s", exc)
            raise errors.ResponseAborted from None

    def close(self) -> None:
        """Returns the connection to the pool if the exchange ended cleanly, else closes it."""
        self.client.stop()
        self.pool.release(self.connection)


def _client_framing(headers: Headers) -> tuple[Framing | None, int]:
    """How the client framed its body; the server has refused every ambiguous framing."""
    for name, value in headers:
        if name == b"transfer-encoding":
            return "chunked", 0
        if name == b"content-length":
            length = int(value)
            return ("length", length) if length else (None, 0)
    return None, 0


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, bool]:
    """At least `limit` bytes of the body, or all of it if shorter, and whether it is all."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        body = message.get("body", b"")
        parts.append(body)
        size += len(body)
        if not message.get("more_body", False):
            return b"".join(parts), True
        if size >= limit:
            return b"".join(parts), False


def _frame(body: bytes, *, chunked: bool) -> bytes:
    return b"%x\r\n%b\r\n" % (len(body), body) if chunked else body


class ClientSide:
    """The client's half of an exchange: the rest of the request body, pumped upstream as
    it arrives, then a watch for the client going away, which ends the exchange at once.

    The server tells of a disconnect only through `receive()`, so this costs a task; with
    no body to pump it is started only once the exchange has lasted `WATCH_CLIENT_AFTER`.
    """

    __slots__ = ("_connection", "_receive", "_task", "_timer", "error", "gone")

    def __init__(self, receive: Receive, connection: UpstreamConnection, *, pump: Framing | None) -> None:
        self._receive = receive
        self._connection = connection
        self.gone = False
        self.error: BaseException | None = None
        self._task: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        if pump is None:
            self._timer = connection.loop.call_later(WATCH_CLIENT_AFTER, self._start_watch)
        else:
            self._task = asyncio.ensure_future(self._pump_then_watch(chunked=pump == "chunked"))

    def _start_watch(self) -> None:
        self._task = asyncio.ensure_future(self._watch())

    async def _pump_then_watch(self, *, chunked: bool) -> None:
        try:
            sent = await _pump_body(self._receive, self._connection, chunked=chunked)
        except ClientDisconnected:
            self.gone = True
            self._connection.abort()
            return
        except Exception as exc:  # a slow client, an upstream that stopped reading
            self.error = exc
            self._connection.abort()
            return
        if sent:
            self._connection.end_request()
        await self._watch()

    async def _watch(self) -> None:
        message: Message = {"type": ""}
        with suppress(OSError, errors.RequestBodyTimeout):
            while message["type"] != "http.disconnect":
                message = await self._receive()
        self.gone = True
        self._connection.abort()

    def raise_failure(self) -> None:
        """Raises what made the client's side end the exchange, if it did."""
        if self.gone:
            raise ClientDisconnected
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()


async def _pump_body(receive: Receive, connection: UpstreamConnection, *, chunked: bool) -> bool:
    """Writes the body upstream as it arrives; False if the upstream closed before its end."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if body:
            connection.write(_frame(body, chunked=chunked))
        if not more:
            if chunked:
                connection.write(b"0\r\n\r\n")
            return not connection.closed
        if connection.closed:
            return False  # it answered early (413, 401) and hung up: the answer is read
        await connection.drain()
