"""A byte-recording upstream for the request-smuggling tests, and the strict reading (h11)
that what the edge forwards is compared with.

`RecordingUpstream` is a raw asyncio TCP server on 127.0.0.1, on an event loop in a thread
of its own. Every connection it accepts gets an index; every byte it receives is kept, in
order, and read by h11 - the reference parser, strict and independent of the llhttp the
edge uses - into requests. Each request is answered according to the first segment of its
path:

| path | answer |
|---|---|
| `/early/...` | 413 as soon as the head is read, before any of the body (which is still read) |
| `/merged/...` | a complete 200, then an unsolicited 302 with `Location` and `Set-Cookie`, in one write |
| `/extra/...` | a complete 200, then a few stray bytes, in one write |
| `/extra-later/...` | a complete 200; 0.1 s later, an unsolicited 302 with `Location` and `Set-Cookie` |
| `/both-framings/...` | 200 with `Content-Length` and `Transfer-Encoding: chunked` |
| `/two-lengths/...` | 200 with two different `Content-Length` fields |
| `/te-gzip/...` | 200 with `Transfer-Encoding: gzip, chunked` |
| `/switching/...` | 101 Switching Protocols to a request that asked for nothing, then a 302 |
| `/head-body/...` | a head with `Content-Length: N` followed by N bytes that are a 302 (sent for a HEAD) |
| `/head-slow-body/...` | a head and the start of a body (for a HEAD); the rest, a 302, once the next request comes |
| anything else | 200, JSON naming the request's method, target, body length and connection |

After `/head-slow-body`, the next request on the connection is answered 0.1 s after the
302 that ends the body: a server still writing its last response when the next request
arrives. The upstream never closes a connection itself and never says `Connection: close`,
whatever it answered: whether a connection is used again is for the edge alone to decide,
and that is what the tests watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import threading
from dataclasses import dataclass, field

import h11

from tests.servers import free_socket

# The unsolicited response a desynchronised connection would hand to the next request.
POISON = (
    b"HTTP/1.1 302 Found\r\nLocation: https://evil.example/phish\r\n"
    b"Set-Cookie: session=attacker; Path=/\r\nContent-Length: 0\r\n\r\n"
)
STRAY = b"XSTRAY-BYTES\r\n"


def behaviour(target: bytes) -> bytes:
    """The first segment of the path: what the upstream does with the request."""
    return target.split(b"?", 1)[0].split(b"/")[1] if target.startswith(b"/") else b""


def answer_body(request: ParsedRequest) -> dict[str, object]:
    return {
        "method": request.method.decode("ascii"),
        "target": request.target.decode("latin-1"),
        "body_length": len(request.body),
        "connection": request.connection,
    }


RAW_ANSWERS: dict[bytes, bytes] = {
    b"merged": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok" + POISON,
    b"extra": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok" + STRAY,
    b"both-framings": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + POISON
    ),
    b"two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 96\r\n\r\nok" + POISON,
    b"te-gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + POISON,
    b"switching": b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: foo\r\n\r\n" + POISON,
    b"head-body": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(POISON), POISON),
}


@dataclass
class ParsedRequest:
    """One request as h11 read it off an upstream connection."""

    connection: int
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # names lower-cased by h11, values as received
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    complete: bool = False  # its end (Content-Length bytes, or the last chunk) was read

    def header(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key == name]


@dataclass
class RecordedConnection:
    index: int
    received: bytearray = field(default_factory=bytearray)  # every byte, in order
    sent: bytearray = field(default_factory=bytearray)
    requests: list[ParsedRequest] = field(default_factory=list)
    error: str | None = None  # the bytes stopped being HTTP/1.1 that h11 could read
    unparsed: bytes = b""  # bytes h11 holds that make no complete event yet
    eof: bool = False  # the edge sent a FIN
    closed: bool = False  # the connection is gone (FIN or RST)


class _UpstreamProtocol(asyncio.Protocol):
    def __init__(self, upstream: RecordingUpstream) -> None:
        self.upstream = upstream
        self.h11 = h11.Connection(h11.SERVER)
        self.transport: asyncio.Transport | None = None
        self.record = RecordedConnection(index=-1)
        self.current: ParsedRequest | None = None
        self.answered = False
        self.owed = b""  # the rest of a body, written when the next request arrives

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.record = RecordedConnection(index=len(self.upstream.connections))
        self.upstream.connections.append(self.record)

    def data_received(self, data: bytes) -> None:
        self.record.received += data
        if self.record.error is not None:
            return
        self.h11.receive_data(data)
        self._read()

    def eof_received(self) -> bool | None:
        self.record.eof = True
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.record.closed = True

    def _read(self) -> None:
        connection = self.h11
        while True:
            if connection.our_state is h11.DONE and connection.their_state is h11.DONE:
                connection.start_next_cycle()
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError as exc:
                self.record.error = str(exc)
                self._abort()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                break
            if isinstance(event, h11.Request):
                self.current = ParsedRequest(
                    connection=self.record.index,
                    method=bytes(event.method),
                    target=bytes(event.target),
                    headers=[(bytes(name), bytes(value)) for name, value in event.headers],
                )
                self.record.requests.append(self.current)
                self.answered = False
                if self.owed:
                    # A server still writing the last response when the next request comes.
                    self._write(self.owed)
                    self.owed = b""
                    self.answered = True
                    self.upstream.loop.call_later(0.1, self._answer_later, self.current)
                elif behaviour(self.current.target) == b"early":
                    self._answer(self.current)
            elif isinstance(event, h11.Data):
                assert self.current is not None
                self.current.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert self.current is not None
                self.current.trailers = [(bytes(name), bytes(value)) for name, value in event.headers]
                self.current.complete = True
                if not self.answered:
                    self._answer(self.current)
        self.record.unparsed = bytes(connection.trailing_data[0])

    def _answer_later(self, request: ParsedRequest) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._answer(request)
            self._read()

    def _answer(self, request: ParsedRequest) -> None:
        self.answered = True
        kind = behaviour(request.target)
        raw = RAW_ANSWERS.get(kind)
        if kind == b"head-slow-body":
            first_part = b"first part of a body a HEAD response must not have;"
            raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (
                len(first_part) + len(POISON),
                first_part,
            )
            self.owed = POISON
        if raw is not None:
            # The state machine is moved on as if a plain response had gone out, so that
            # whatever the edge sends next on this connection is still read as requests.
            self.h11.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
            self.h11.send(h11.EndOfMessage())
            self._write(raw)
            return
        if kind == b"early":
            status, body = 413, json.dumps({"early": True, "target": request.target.decode("latin-1")}).encode()
        else:
            status, body = 200, json.dumps(answer_body(request)).encode()
        head = h11.Response(
            status_code=status,
            headers=[("content-type", "application/json"), ("content-length", str(len(body)))],
        )
        data = self.h11.send(head)
        if request.method != b"HEAD":
            data += self.h11.send(h11.Data(data=body))
        self._write(data + self.h11.send(h11.EndOfMessage()))
        if kind == b"extra-later":
            self.upstream.loop.call_later(0.1, self._write, POISON)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.record.sent += data
            self.transport.write(data)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class RecordingUpstream:
    """The upstream that keeps every byte; read it with `snapshot()`."""

    def __init__(self) -> None:
        self.sock = free_socket()
        self.port: int = self.sock.getsockname()[1]
        self.connections: list[RecordedConnection] = []  # touched on the upstream's loop only
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RecordingUpstream:
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the recording upstream did not start")
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            self.loop.stop()

        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        self.thread.join(timeout=5)
        self.sock.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.sock.listen(128)
        self._server = self.loop.run_until_complete(
            self.loop.create_server(lambda: _UpstreamProtocol(self), sock=self.sock)
        )
        self._ready.set()
        self.loop.run_forever()

    def snapshot(self) -> list[RecordedConnection]:
        """A consistent copy of every connection's record, taken on the upstream's loop, so
        every byte that has arrived so far has been read."""

        async def copy_records() -> list[RecordedConnection]:
            return copy.deepcopy(self.connections)

        return asyncio.run_coroutine_threadsafe(copy_records(), self.loop).result(timeout=5)


# -- the strict reading of what a client sent -----------------------------------------------------


@dataclass(frozen=True)
class Framed:
    """A request as framed by a strict reading: what may reach the upstream, and only once."""

    method: bytes
    target: bytes
    body: bytes = b""


@dataclass
class StrictReading:
    requests: list[Framed]
    error: str | None  # why h11 stopped before the end of the bytes, if it did


def strict_reading(data: bytes) -> StrictReading:
    """The requests h11 reads in `data`, in order, answering each with a plain 404 (which
    also turns down any Upgrade or CONNECT, so the bytes after it are read as HTTP)."""
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(data)
    connection.receive_data(b"")
    requests: list[Framed] = []
    method = target = b""
    body = bytearray()
    while True:
        if connection.our_state is h11.DONE and connection.their_state is h11.DONE:
            connection.start_next_cycle()
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as exc:
            return StrictReading(requests, str(exc))
        if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            return StrictReading(requests, None)
        if isinstance(event, h11.Request):
            method, target, body = bytes(event.method), bytes(event.target), bytearray()
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            requests.append(Framed(method, target, bytes(body)))
            connection.send(h11.Response(status_code=404, headers=[("content-length", "0")]))
            connection.send(h11.EndOfMessage())
            if connection.our_state is h11.MUST_CLOSE:
                rest = connection.trailing_data[0]
                return StrictReading(requests, "data after a request that closes the connection" if rest else None)
