"""The proxy core: forwards an HTTP exchange to the upstream unchanged, streaming.

Follow one request: `__call__` -> `_open_exchange` (the request head built and its framing
checked by `_request_head`; a pooled connection; the body pumped as it arrives; the
response head awaited; a stale keep-alive connection retried once when that is safe) ->
`Exchange.relay` (the response passed on chunk by chunk) -> `Exchange.close`.

Every failure before the response starts becomes an edge-made error in the project's
envelope; after it starts, the client's connection is cut so a truncated body is never
mistaken for a complete one. Whatever way the exchange ends - client gone, upstream gone,
timeout, cancellation - the upstream connection is either returned clean to the pool or
closed, never leaked.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from typing import Literal

from starlette.types import Message, Receive, Scope, Send

from edge import errors
from edge.proxy.headers import RESPONSE_HOP_BY_HOP, Headers, removable_fields
from edge.proxy.ingress import FORWARDED_SCOPE_KEY, ForwardedRequest
from edge.proxy.upstream import (
    PoolExhausted,
    StaleConnection,
    UpstreamConnection,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
    UpstreamUnavailable,
)

logger = logging.getLogger("edge.proxy")

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

# Exchanges shorter than this end before a client's disconnect could matter; only longer
# ones pay for a task that watches the client. Under load, queueing alone makes every
# exchange last a few milliseconds, so the threshold sits well above that.
WATCH_CLIENT_AFTER = 0.05

Framing = Literal["length", "chunked"] | None

# The upstream's status, for the layers around the core (the access log); absent when the
# edge answered itself.
UPSTREAM_STATUS_SCOPE_KEY = "edge.upstream_status"


class BadRequest(Exception):
    """The request cannot be forwarded as it is (ambiguous framing)."""


class ClientDisconnected(Exception):
    """The client went away before the exchange finished."""


class ResponseAborted(Exception):
    """Raised after the response started to make the server cut the client's connection.

    The server logs it; `edge.logs` drops that record, the proxy has already said why.
    """


class HttpForwarder:
    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self._path_prefix = pool.origin.path_prefix
        self._default_host = pool.origin.authority

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            exchange = await self._open_exchange(scope, receive)
        except ClientDisconnected:
            return  # nobody is left to answer
        except BadRequest:
            await errors.send_error(scope, send, errors.BAD_REQUEST)
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
            # Only the server cancels a request: when the drain ends, or its body was malformed.
            await errors.send_error(scope, send, errors.SHUTTING_DOWN, [(b"retry-after", b"1")])
            raise
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

    def _request_head(self, scope: Scope) -> tuple[bytes, Framing]:
        """The request line and headers for the upstream, and how the body is framed."""
        target = self._path_prefix + scope["raw_path"]
        if scope["query_string"]:
            target += b"?" + scope["query_string"]
        parts = [scope["method"].encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
        content_length: bytes | None = None
        chunked = has_host = False
        for name, value in scope["headers"]:
            if name == b"transfer-encoding":
                # Only chunked can be re-framed faithfully; anything else is refused.
                if value.rsplit(b",", 1)[-1].strip().lower() != b"chunked":
                    raise BadRequest
                chunked = True
                continue
            if name == b"content-length":
                if content_length is not None:
                    if value != content_length:
                        raise BadRequest
                    continue
                content_length = value
            elif name == b"host":
                has_host = True
            parts += (name, b": ", value, b"\r\n")
        framing: Framing = None
        if chunked:
            if content_length is not None:
                raise BadRequest  # request smuggling: both framings at once
            parts.append(b"transfer-encoding: chunked\r\n")
            framing = "chunked"
        elif content_length is not None and content_length.strip() != b"0":
            framing = "length"
        if not has_host:
            parts += (b"host: ", self._default_host, b"\r\n")
        forwarded: ForwardedRequest = scope[FORWARDED_SCOPE_KEY]
        for name, value in forwarded.upstream_headers():
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts), framing

    async def _open_exchange(self, scope: Scope, receive: Receive) -> Exchange:
        """Sends the request and waits for the response head."""
        head, framing = self._request_head(scope)
        head_request = scope["method"] == "HEAD"
        # Only a request without a body can be sent again: a streamed body is gone.
        retryable = framing is None and scope["method"] in IDEMPOTENT_METHODS
        while True:
            connection = await self.pool.acquire()
            client_watch: ClientWatch | None = None
            try:
                connection.start(head_request=head_request)
                connection.write(head)
                if framing is not None:
                    await _pump_body(receive, connection, chunked=framing == "chunked")
                client_watch = ClientWatch(receive, connection)
                status, headers = await connection.read_head()
                return Exchange(self.pool, connection, client_watch, status, headers)
            except StaleConnection:
                self._end(connection, client_watch)
                if not retryable:
                    raise
                retryable = False
            except UpstreamError:
                self._end(connection, client_watch)
                if client_watch is not None and client_watch.client_gone:
                    raise ClientDisconnected from None  # the watch closed the connection
                raise
            except BaseException:
                self._end(connection, client_watch)
                raise

    def _end(self, connection: UpstreamConnection, client_watch: ClientWatch | None) -> None:
        if client_watch is not None:
            client_watch.stop()
        self.pool.release(connection)


class Exchange:
    """An exchange whose response head has arrived: relays the response, then ends."""

    __slots__ = ("client_watch", "connection", "headers", "pool", "status")

    def __init__(
        self,
        pool: UpstreamPool,
        connection: UpstreamConnection,
        client_watch: ClientWatch,
        status: int,
        headers: Headers,
    ) -> None:
        self.pool = pool
        self.connection = connection
        self.client_watch = client_watch
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
        except Exception as exc:
            if self.client_watch.client_gone:
                return
            logger.warning("response cut short: %s", exc or type(exc).__name__)
            raise ResponseAborted from None

    def close(self) -> None:
        """Returns the connection to the pool if the exchange ended cleanly, else closes it."""
        self.client_watch.stop()
        self.pool.release(self.connection)


async def _pump_body(receive: Receive, connection: UpstreamConnection, *, chunked: bool) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if chunked:
            if body:
                connection.write(b"%x\r\n%b\r\n" % (len(body), body))
            if not more:
                connection.write(b"0\r\n\r\n")
        elif body:
            connection.write(body)
        if not more or connection.closed:
            # A closed connection may have answered early (413, 401): read that answer.
            return
        await connection.drain()


class ClientWatch:
    """Closes the upstream exchange as soon as the client goes away.

    The server tells of a disconnect only through `receive()`, so watching costs a task;
    it is started only once the exchange has lasted `WATCH_CLIENT_AFTER`.
    """

    __slots__ = ("_connection", "_receive", "_task", "_timer", "client_gone")

    def __init__(self, receive: Receive, connection: UpstreamConnection) -> None:
        self._receive = receive
        self._connection = connection
        self._task: asyncio.Task[None] | None = None
        self._timer = connection.loop.call_later(WATCH_CLIENT_AFTER, self._start)
        self.client_gone = False

    def _start(self) -> None:
        self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        message: Message = {"type": ""}
        with suppress(OSError):
            while message["type"] != "http.disconnect":
                message = await self._receive()
        self.client_gone = True
        self._connection.abort()

    def stop(self) -> None:
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
