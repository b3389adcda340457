"""Upstream replicas on several loopback addresses, and the name that resolves to them.

`Replicas` stands in for Docker's DNS, which resolves a service name to the address of
every replica: the edge's resolver (its one seam to the system's name resolution, which a
test on a shared machine cannot make return several addresses - `localhost` gives
127.0.0.1 only here) answers with the addresses the test lists, and the test changes the
list as replicas come and go. Everything else is real: each `Replica` is a TCP server
bound to its own loopback address (127.0.0.1, 127.0.0.2, 127.0.0.3: all loopback on
Linux), all on the same port, as replicas behind one service name are.

A replica counts the connections it accepts (at the socket level, so connection attempts
the edge makes are counted even when nothing is sent on them), keeps every byte it
receives, and reads it with h11 into requests. It answers by the request's path:

| path | answer |
|---|---|
| `/hold` | nothing until the test calls `release_held()`, then as any other path |
| `/die-mid-response` | the head of a 1000-byte response and 10 bytes of it, then a reset |
| `/reset-after-request` | the whole request is read, then the connection reset, unanswered |
| anything else | 200 with its own address as the body, kept alive |

With `resetting` set, a replica resets each connection as soon as it is accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from dataclasses import dataclass

import h11

from tests.servers import closed_port

ADDRESSES = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
NAME = "replicas.test"  # a reserved name (RFC 6761) that no real resolver answers


class Replicas:
    """The upstream's name: resolves to `addresses`, which the test may change at any time."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = list(addresses)
        self.port = closed_port()
        self.resolutions = 0

    @property
    def url(self) -> str:
        return f"http://{NAME}:{self.port}"

    async def __call__(self, host: str, port: int) -> list[str]:
        assert (host, port) == (NAME, self.port), (host, port)
        self.resolutions += 1
        return list(self.addresses)


@dataclass
class SeenRequest:
    method: bytes
    target: bytes
    body: bytes


class Replica:
    """One replica: a TCP server on `host`:`port`, started, stopped and restarted at will."""

    def __init__(self, host: str, port: int, loop: asyncio.AbstractEventLoop) -> None:
        self.host = host
        self.port = port
        self.loop = loop
        self.accepted = 0
        self.received = bytearray()
        self.requests: list[SeenRequest] = []
        self.resetting = False
        self.connections: set[_ReplicaConnection] = set()
        self._server: asyncio.Server | None = None
        self._held: asyncio.Event | None = None

    def start(self) -> Replica:
        async def listen() -> None:
            self._held = asyncio.Event()
            self._server = await self.loop.create_server(
                lambda: _ReplicaConnection(self), self.host, self.port, reuse_address=True
            )

        asyncio.run_coroutine_threadsafe(listen(), self.loop).result(5)
        return self

    def stop(self) -> None:
        """As a killed replica: the port refuses from now on, open connections are closed."""

        async def close() -> None:
            if self._server is not None:
                self._server.close()
                for connection in list(self.connections):
                    connection.close()
                await self._server.wait_closed()
                self._server = None

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)

    def release_held(self) -> None:
        held = self._held
        if held is not None:
            self.loop.call_soon_threadsafe(held.set)

    @property
    def open_connections(self) -> int:
        return len(self.connections)

    def answered(self, path: str) -> int:
        """How many requests for exactly `path` this replica has read."""
        return sum(request.target == path.encode() for request in self.requests)

    async def held(self) -> None:
        assert self._held is not None
        await self._held.wait()


class _ReplicaConnection(asyncio.Protocol):
    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.h11 = h11.Connection(h11.SERVER)
        self.transport: asyncio.Transport | None = None
        self.request: SeenRequest | None = None
        self.answering: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.replica.accepted += 1
        self.replica.connections.add(self)
        if self.replica.resetting:
            self.reset()

    def connection_lost(self, exc: Exception | None) -> None:
        self.replica.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        self.replica.received += data
        self.h11.receive_data(data)
        self._read()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def reset(self) -> None:
        """Close with a TCP RST rather than a FIN."""
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _read(self) -> None:
        while self.transport is not None and not self.transport.is_closing():
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError:
                self.reset()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                return
            if isinstance(event, h11.Request):
                self.request = SeenRequest(bytes(event.method), bytes(event.target), b"")
            elif isinstance(event, h11.Data) and self.request is not None:
                self.request.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage) and self.request is not None:
                self.replica.requests.append(self.request)
                self.answering = asyncio.ensure_future(self._answer(self.request.target))
                return  # read on once answered

    async def _answer(self, target: bytes) -> None:
        assert self.transport is not None
        if target == b"/hold":
            await self.replica.held()
        if target == b"/reset-after-request":
            self.reset()
            return
        if target == b"/die-mid-response":
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
            await asyncio.sleep(0.05)
            self.reset()
            return
        body = self.replica.host.encode()
        if self.transport.is_closing():
            return
        events = [h11.Response(status_code=200, headers=[("content-length", str(len(body)))]), h11.Data(data=body)]
        self.transport.write(b"".join(self.h11.send(event) or b"" for event in [*events, h11.EndOfMessage()]))
        self.h11.start_next_cycle()
        self._read()


class ReplicaSet:
    """Replicas on `ADDRESSES`, all on the port of `replicas`, on one event loop thread."""

    def __init__(self, replicas: Replicas) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.by_host = {host: Replica(host, replicas.port, self.loop) for host in ADDRESSES}

    def __getitem__(self, host: str) -> Replica:
        return self.by_host[host]

    def answering(self, path: str) -> dict[str, int]:
        return {host: replica.answered(path) for host, replica in self.by_host.items()}

    def received(self) -> bytes:
        return b"".join(bytes(replica.received) for replica in self.by_host.values())

    def close(self) -> None:
        for replica in self.by_host.values():
            with contextlib.suppress(Exception):
                replica.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
