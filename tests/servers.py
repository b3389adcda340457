"""Real servers on loopback for the tests: upstreams that behave and misbehave on purpose,
and the edge itself, each on its own event loop in a background thread.

Nothing here mocks the forwarding path: every byte crosses a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from edge.app import EdgeApp, build_app
from edge.policy import Policy
from edge.proxy import Proxy
from edge.server.serve import server_config
from edge.settings import EdgeSettings


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.005) -> bool:
    """Polls `predicate` until it holds or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def free_socket() -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio turns Nagle off only on sockets that say they are TCP,
    # and a response written in two parts would otherwise wait 40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def closed_port() -> int:
    """A port where nothing listens, for a process to bind later. Drawn below the kernel's
    ephemeral range, from which every outgoing connection meanwhile takes its local port:
    a port handed out from that range (`bind(0)`) was now and then taken by one before the
    process bound it (seen: "address already in use" starting a stack). Never the same
    port twice in one test session."""
    low = _ephemeral_low()
    while True:
        port = _PORTS.randrange(max(1024, low - 15_000), low)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("0.0.0.0", port))  # free on every address, as a server binds it
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port


_PORTS = random.Random()
_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


class ServerThread:
    """A uvicorn server on a pre-bound loopback socket, in a thread of its own."""

    def __init__(self, config: uvicorn.Config) -> None:
        self.sock = free_socket()
        self.port: int = self.sock.getsockname()[1]
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self) -> None:
        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self.sock])

        # The loop the config names (uvloop), as `uvicorn.run` would use in production.
        with asyncio.Runner(loop_factory=self.server.config.get_loop_factory()) as runner:
            runner.run(serve())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


# -- the well-behaved (and slow, and chatty) upstream ---------------------------------------------


@dataclass
class RecordedRequest:
    method: str
    raw_path: bytes
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body_length: int
    body_sha256: str

    def header(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key == name]


@dataclass
class UpstreamRecord:
    requests: list[RecordedRequest] = field(default_factory=list)
    websockets: list[RecordedRequest] = field(default_factory=list)  # the handshakes
    disconnects: list[tuple[str, float]] = field(default_factory=list)
    websocket_closes: list[tuple[int, str]] = field(default_factory=list)

    def paths(self) -> list[bytes]:
        return [request.raw_path for request in self.requests]

    def saw_path(self, path: str) -> bool:
        """Whether a request or a WebSocket handshake for exactly `path` arrived."""
        return any(seen.raw_path == path.encode() for seen in [*self.requests, *self.websockets])


def pattern_bytes(size: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """A deterministic, non-repeating-looking byte stream of `size` bytes."""
    block = hashlib.sha256(b"edge").digest() * (chunk // 32)
    sent = 0
    while sent < size:
        part = block[: min(chunk, size - sent)]
        sent += len(part)
        yield part


def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for part in pattern_bytes(size):
        digest.update(part)
    return digest.hexdigest()


CONTENT_TYPES = {
    "html": b"text/html; charset=utf-8",
    "js": b"text/javascript",
    "text": b"text/plain",
    "json": b"application/json",
}


class UpstreamApp:
    """The upstream the edge tests forward to. Everything it sees is recorded.

    Endpoints: /bytes/N (N pattern bytes; `?chunked=1` without a length), /sse (`?n=` events
    every `?interval=` seconds), /slow (`?delay=` seconds, or until the client goes),
    /cookies, /hop-by-hop, /status/N, /head; WebSocket /ws/reject (401), and any other path
    accepts and echoes. Any other HTTP path answers the JSON of what it saw (method, path,
    raw path, query, headers, body length and sha256) - none for 204 and 304 - and its query
    scripts the answer: `status=N`, `type=html|js|text|json` (the content type; the body stays
    JSON), `header=Name: Value` (repeatable; extra response fields).
    """

    def __init__(self) -> None:
        self.record = UpstreamRecord()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
            return
        path: str = scope["path"]
        query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
        if path.startswith("/bytes/"):
            await self.download(scope, receive, send, int(path.rsplit("/", 1)[1]), query)
        elif path == "/sse":
            await self.sse(send, query)
        elif path == "/slow":
            await self.slow(scope, receive, send, float(query.get("delay", "2")))
        else:
            body = await self.read_and_record(scope, receive)
            await self.respond(scope, send, path, body)

    def _recorded(self, scope: Scope, body_length: int, digest: str) -> RecordedRequest:
        return RecordedRequest(
            method=scope.get("method", "WEBSOCKET"),
            raw_path=scope["raw_path"],
            query_string=scope["query_string"],
            headers=list(scope["headers"]),
            body_length=body_length,
            body_sha256=digest,
        )

    async def read_and_record(self, scope: Scope, receive: Receive) -> RecordedRequest:
        digest = hashlib.sha256()
        length = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.record.disconnects.append((scope["path"], time.monotonic()))
                break
            chunk = message.get("body", b"")
            digest.update(chunk)
            length += len(chunk)
            if not message.get("more_body"):
                break
        recorded = self._recorded(scope, length, digest.hexdigest())
        self.record.requests.append(recorded)
        return recorded

    async def respond(self, scope: Scope, send: Send, path: str, request: RecordedRequest) -> None:
        headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
        status = 200
        body = b"{}"
        if path == "/cookies":
            headers += [
                (b"set-cookie", b"a=1; Path=/"),
                (b"set-cookie", b"b=2; Path=/; HttpOnly"),
                (b"set-cookie", b"c=3, with comma; Path=/"),
                (b"x-multi", b"first"),
                (b"x-multi", b"second"),
            ]
        elif path == "/hop-by-hop":
            headers += [
                (b"connection", b"X-Internal-Token, keep-alive"),
                (b"x-internal-token", b"secret"),
                (b"keep-alive", b"timeout=5"),
                (b"proxy-authenticate", b"Basic"),
                (b"x-kept", b"yes"),
                (b"server", b"upstream-server"),
                (b"date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
            ]
        elif path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            body = b"" if status in (204, 304) else b"{}"
        elif path == "/head":
            body = b"x" * 1000
            headers = [(b"content-type", b"text/plain")]
        else:
            for key, value in parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True):
                if key == "status":
                    status = int(value)
                elif key == "type":
                    headers[0] = (b"content-type", CONTENT_TYPES[value])
                elif key == "header":
                    name, _, field_value = value.partition(":")
                    headers.append((name.strip().encode(), field_value.strip().encode()))
            body = json.dumps(
                {
                    "method": request.method,
                    "path": scope["path"],
                    "raw_path": request.raw_path.decode("latin-1"),
                    "query_string": request.query_string.decode("latin-1"),
                    "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.headers],
                    "body_length": request.body_length,
                    "body_sha256": request.body_sha256,
                }
            ).encode()
        if status not in (204, 304):
            headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body if status not in (204, 304) else b""})

    async def download(self, scope: Scope, receive: Receive, send: Send, size: int, query: dict[str, str]) -> None:
        await self.read_and_record(scope, receive)
        headers = [(b"content-type", b"application/octet-stream")]
        if query.get("chunked") != "1":
            headers.append((b"content-length", str(size).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for part in pattern_bytes(size):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def sse(self, send: Send, query: dict[str, str]) -> None:
        count = int(query.get("n", "3"))
        interval = float(query.get("interval", "0.5"))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            }
        )
        for number in range(count):
            if number:
                await asyncio.sleep(interval)
            event = f"id: {number}\ndata: event {number}\n\n".encode()
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def slow(self, scope: Scope, receive: Receive, send: Send, delay: float) -> None:
        await self.read_and_record(scope, receive)

        async def wait_for_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.record.disconnects.append(("/slow", time.monotonic()))

        watcher = asyncio.ensure_future(wait_for_disconnect())
        done, _ = await asyncio.wait({watcher}, timeout=delay)
        if done:
            return
        watcher.cancel()
        body = b'{"slow":true}'
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"13")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.record.websockets.append(self._recorded(scope, 0, ""))
        await receive()  # websocket.connect
        if scope["path"] == "/ws/reject":
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": 401,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "websocket.http.response.body", "body": b'{"denied":true}'})
            return
        offered = scope.get("subprotocols") or []
        chosen = "chat.v2" if "chat.v2" in offered else (offered[0] if offered else None)
        headers = [(b"x-upstream-saw-origin", dict(scope["headers"]).get(b"origin", b"-"))]
        await send({"type": "websocket.accept", "subprotocol": chosen, "headers": headers})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self.record.websocket_closes.append((message.get("code", 1000), message.get("reason") or ""))
                return
            text = message.get("text")
            if text is not None and text.startswith("close:"):
                _, code, reason = text.split(":", 2)
                await send({"type": "websocket.close", "code": int(code), "reason": reason})
                return
            if text is not None:
                await send({"type": "websocket.send", "text": text})
            else:
                await send({"type": "websocket.send", "bytes": message.get("bytes")})


def serve(app: ASGIApp, **options: Any) -> ServerThread:
    """A test server for `app` on loopback, started: uvloop and httptools as in production,
    quiet, and with no `server` header of its own unless `options` say otherwise."""
    config = uvicorn.Config(
        app,
        **{
            "loop": "uvloop",
            "http": "httptools",
            "ws": "websockets-sansio",
            "log_level": "warning",
            "access_log": False,
            "lifespan": "off",
            "server_header": False,
            **options,
        },
    )
    return ServerThread(config).start()


def start_upstream() -> tuple[ServerThread, UpstreamApp]:
    app = UpstreamApp()
    return serve(app, lifespan="on", timeout_keep_alive=30), app


# -- the upstream that breaks HTTP on purpose -------------------------------------------------------


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes, int], Any]


class RawUpstream:
    """A TCP server that speaks just enough HTTP/1.1 to misbehave precisely.

    The request path picks the misbehaviour; `requests_seen` counts request heads read,
    `open_connections` the connections still open.
    """

    def __init__(self) -> None:
        self.sock = free_socket()
        self.port: int = self.sock.getsockname()[1]
        self.requests_seen: list[bytes] = []
        self.open_connections = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RawUpstream:
        self.thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        self.thread.join(timeout=5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.sock.listen(128)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, sock=self.sock))
        self._ready.set()
        self.loop.run_forever()
        server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        served = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request_line = head.split(b"\r\n", 1)[0]
                path = request_line.split(b" ")[1]
                self.requests_seen.append(path)
                length = _content_length(head)
                if length:
                    await reader.readexactly(length)
                if not await self._respond(path, served, reader, writer):
                    return
                served += 1
        finally:
            self.open_connections -= 1
            with contextlib.suppress(Exception):
                writer.close()

    async def _respond(
        self, path: bytes, served: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answers one request; False ends the connection."""
        ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
        if path.startswith(b"/reset-before-response"):
            _reset(writer)
            return False
        if path.startswith(b"/close-before-response"):
            return False
        if path.startswith(b"/die-mid-body"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
            await writer.drain()
            await asyncio.sleep(0.05)
            _reset(writer)
            return False
        if path.startswith(b"/die-mid-chunked"):
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            _reset(writer)
            return False
        if path.startswith(b"/malformed"):
            writer.write(b"HTTP/1.1 2OO NOT OK\r\n\r\n")
            await writer.drain()
            return False
        if path.startswith(b"/both-framings"):
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            )
            await writer.drain()
            return False
        if path.startswith(b"/read-until-close"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
            await writer.drain()
            return False
        if path.startswith(b"/informational"):
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
            writer.write(ok)
            await writer.drain()
            return True
        if path.startswith(b"/one-per-connection"):
            # The keep-alive race: the upstream drops its idle connection just as the
            # next request arrives on it, so that request gets no answer at all.
            if served:
                _reset(writer)
                return False
            writer.write(ok)
            await writer.drain()
            return True
        if path.startswith(b"/hang"):
            await asyncio.sleep(3600)
            return False
        writer.write(ok)
        await writer.drain()
        return True


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    transport = writer.transport
    transport.abort()


# -- the edge ---------------------------------------------------------------------------------------------


@dataclass
class RunningEdge:
    server: ServerThread
    proxy: Proxy
    settings: EdgeSettings

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port


def start_edge(upstream_url: str, policy: Policy | None = None, **overrides: Any) -> RunningEdge:
    """The edge as `python -m edge` builds it. Rate limiting and the body limit are off unless
    a test asks for them: most tests send more requests, and bigger ones, than a client may."""
    overrides.setdefault("rate_limit_default", "off")
    overrides.setdefault("max_body_bytes", 1 << 40)
    settings = EdgeSettings(upstream_url=upstream_url, **overrides)
    app = build_app(settings, policy or Policy())
    config = server_config(settings, app)
    return RunningEdge(ServerThread(config).start(), proxy_of(app), settings)


def proxy_of(app: ASGIApp) -> Proxy:
    """The proxy core under the edge's layers (each layer holds the next as `app`), whose
    upstream pool the tests watch."""
    layer: Any = app
    while not isinstance(layer, EdgeApp):
        layer = layer.app
    assert isinstance(layer.proxy, Proxy)
    return layer.proxy


@contextlib.contextmanager
def running_edge(upstream_url: str, policy: Policy | None = None, **overrides: Any) -> Iterator[RunningEdge]:
    edge = start_edge(upstream_url, policy, **overrides)
    try:
        yield edge
    finally:
        edge.server.stop()
