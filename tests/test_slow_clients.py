"""No slow client can starve the others (docs/proxy.md, "Slow clients").

Every wait on a client is bounded - the head, the idle time between requests, the body's
rate and silence, the time a response waits to be taken - and what one address may hold
is capped: connections at accept, exchanges in flight. Small bodies are read before an
upstream connection is taken, so a slow sender holds only its own connection.

Each test drives real sockets with exact bytes and measures when the edge acts, against
edges started with short timeouts. The bounds are checked both ways: the edge must act no
sooner than its setting says (with 50 ms of timer slack) and not much later (with room for
a loaded 2-core machine). Without the bound under test - no timeouts, no caps, no
buffering - each test fails: the edge would wait for ever, serve one more, or hold the
upstream pool. Three tests guard the other side instead and fail if a bound is drawn too
tight or too crude: a slow but steady upload completes, a slow but steady reader is not
cut, and without request buffering slow senders do hold the pool (the contrast that shows
what buffering is for).

The upstream is a real uvicorn server of this module's own, so what it records and the
connections open at it are this module's alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import select
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.servers import (
    RunningEdge,
    ServerThread,
    UpstreamApp,
    pattern_bytes,
    pattern_sha256,
    running_edge,
    start_upstream,
    wait_until,
)
from tests.wire import WireClient, WireResponse

OTHER = "127.0.0.2"  # another client address, on the same loopback
EARLY = 0.05  # timer slack: an edge acting this much before its bound is still on time
LATE = 1.0  # how much later than its bound the edge may act on a loaded machine
PROMPT = 1.0  # an answer that does not wait for anything comes within this

HEAD_TIMEOUT = 0.5
BODY_TIMEOUT = 0.5
WRITE_TIMEOUT = 0.5
QUIET: dict[str, Any] = {"access_log": False, "log_level": "warning"}


# -- clients ---------------------------------------------------------------------------------------


def connect(port: int, source: str = "127.0.0.1", *, timeout: float = 5.0, rcvbuf: int | None = None) -> socket.socket:
    """A TCP connection to the edge from `source` (any 127.0.0.0/8 address is loopback)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.settimeout(timeout)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


class Client(WireClient):
    """tests.wire.WireClient from a chosen source address."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self.sock = connect(port, source, timeout=timeout)
        self.timeout = timeout
        self.buffer = b""
        self.connected_at = time.monotonic()

    def exchange(self, request: bytes) -> WireResponse:
        self.send(request)
        return self.read_response()


def get(path: str, *extra: str) -> bytes:
    lines = "".join(f"{line}\r\n" for line in extra)
    return f"GET {path} HTTP/1.1\r\nHost: edge.test\r\n{lines}\r\n".encode()


def post_head(path: str, length: int, *extra: str) -> bytes:
    lines = "".join(f"{line}\r\n" for line in extra)
    return f"POST {path} HTTP/1.1\r\nHost: edge.test\r\nContent-Length: {length}\r\n{lines}\r\n".encode()


def timed_get(port: int, path: str, *extra: str, source: str = OTHER) -> tuple[WireResponse, float]:
    """One request on a new connection: the response and how long it took, connect included."""
    started = time.monotonic()
    with Client(port, source) as client:
        response = client.exchange(get(path, *extra))
    return response, time.monotonic() - started


def trickle(sock: socket.socket, data: bytes, *, step: int, interval: float, limit: float = 10.0) -> float:
    """Sends `data` `step` bytes at a time, `interval` seconds apart, until the edge says
    something (the socket turns readable, a close included), the data runs out or `limit`
    seconds have passed. Returns when the first byte was sent."""
    started = time.monotonic()
    for offset in range(0, len(data), step):
        try:
            sock.sendall(data[offset : offset + step])
        except OSError:
            break
        readable, _, _ = select.select([sock], [], [], interval)
        if readable or time.monotonic() - started > limit:
            break
    return started


def closed_without_a_word(sock: socket.socket, wait: float) -> tuple[bool, bytes]:
    """Whether the peer closes (FIN or RST) within `wait` seconds, and what it sent first."""
    timeout = sock.gettimeout()
    deadline = time.monotonic() + wait
    data = b""
    try:
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(65536)
            if not chunk:
                return True, data
            data += chunk
    except ConnectionResetError:
        return True, data
    except TimeoutError:
        return False, data
    finally:
        sock.settimeout(timeout)


def reset_close(sock: socket.socket) -> None:
    """Leaves with an RST, so no lingering close keeps anything open."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def assert_error(response: WireResponse, status: int, code: str) -> dict[str, str]:
    """The edge's own refusal: the status, and the envelope with a request id that is also
    the response's X-Request-ID."""
    assert response.status == status, response.head
    assert response.values("content-type") == [b"application/json"], response.head
    envelope = response.json()
    assert set(envelope) == {"error"}, envelope
    error: dict[str, str] = envelope["error"]
    assert set(error) == {"code", "message", "request_id"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["request_id"], str)
    assert error["request_id"]
    assert response.values("x-request-id") == [error["request_id"].encode()], response.head
    return error


def assert_between(elapsed: float, bound: float, what: str, late: float = LATE) -> None:
    assert bound - EARLY <= elapsed <= bound + late, f"{what} after {elapsed:.3f} s; the bound is {bound} s"


def marker() -> str:
    return uuid.uuid4().hex


def seen_by_upstream(upstream: UpstreamApp, mark: str) -> bool:
    return any(mark.encode() in request.raw_path + request.query_string for request in list(upstream.record.requests))


def upstream_disconnects(upstream: UpstreamApp, path: str) -> list[float]:
    return [at for seen, at in list(upstream.record.disconnects) if seen == path]


def upstream_connections(server: ServerThread) -> int:
    return len(server.server.server_state.connections)


def assert_pool_free(edge: RunningEdge, server: ServerThread, timeout: float = 3.0) -> None:
    """Nothing in use in `edge`'s pool, and nothing open at the upstream but the idle
    connections of this module's edges."""
    pool = edge.proxy.pool
    assert wait_until(lambda: pool.in_use == 0, timeout), f"{pool.in_use} upstream connections still in use"

    def idle() -> int:
        return sum(live.proxy.pool.idle for live in LIVE_EDGES)

    assert wait_until(lambda: upstream_connections(server) <= idle(), timeout), (
        f"{upstream_connections(server)} connections open at the upstream, {idle()} idle in the pools"
    )


class Sampler(threading.Thread):
    """Samples a number (the pool's `in_use`) every few milliseconds until stopped."""

    def __init__(self, read: Callable[[], int]) -> None:
        super().__init__(daemon=True)
        self.read = read
        self.samples: list[int] = []
        self.times: list[float] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.times.append(time.monotonic())
            self.samples.append(self.read())
            time.sleep(0.005)

    def stop(self) -> list[int]:
        self.stopped.set()
        self.join()
        return self.samples

    def before(self, moment: float) -> list[int]:
        return [sample for at, sample in zip(self.times, self.samples, strict=True) if at < moment]


# -- edges -----------------------------------------------------------------------------------------


LIVE_EDGES: list[RunningEdge] = []


@contextlib.contextmanager
def edge_with(upstream_url: str, **overrides: Any) -> Iterator[RunningEdge]:
    """An edge of this module's, quiet (no access log), with `overrides` of its settings."""
    with running_edge(upstream_url, **(QUIET | overrides)) as edge:
        LIVE_EDGES.append(edge)
        try:
            yield edge
        finally:
            LIVE_EDGES.remove(edge)


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[tuple[ServerThread, UpstreamApp]]:
    server, app = start_upstream()
    yield server, app
    server.stop()


@pytest.fixture(scope="module")
def upstream(upstream_server: tuple[ServerThread, UpstreamApp]) -> UpstreamApp:
    return upstream_server[1]


@pytest.fixture(scope="module")
def head_edge(upstream_server: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    """Heads due in 0.5 s; idle connections kept six times as long."""
    with edge_with(upstream_server[0].url, client_header_timeout=HEAD_TIMEOUT, client_keep_alive_timeout=3.0) as edge:
        yield edge


@pytest.fixture(scope="module")
def idle_edge(upstream_server: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    """Idle connections kept 0.8 s; heads due sooner, in 0.3 s."""
    with edge_with(upstream_server[0].url, client_header_timeout=0.3, client_keep_alive_timeout=0.8) as edge:
        yield edge


def body_edge_options(**overrides: Any) -> dict[str, Any]:
    return {
        "client_header_timeout": 5.0,
        "client_body_timeout": BODY_TIMEOUT,
        "client_body_min_rate": 1024,
        "upstream_pool_size": 1,
        "upstream_connect_timeout": 2.0,
        # Short, so a test can choose between a new upstream connection and a reused one.
        "upstream_idle_timeout": POOL_IDLE,
        **overrides,
    }


POOL_IDLE = 1.0  # long enough that a warmed-up connection is still there for the next request


def on_connection(edge: RunningEdge, connection: str) -> RunningEdge:
    """Makes the next exchange of `edge` (pool of one) take a new upstream connection, or
    reuse the one a request has just left in the pool."""
    if connection == "new":
        time.sleep(POOL_IDLE + 0.05)  # the idle one has expired: it is dropped, not reused
    else:
        assert timed_get(edge.port, "/echo?warm-up")[0].status == 200
        assert wait_until(lambda: edge.proxy.pool.idle == 1, 1.0)
    return edge


@pytest.fixture(scope="module")
def buffering_edge(upstream_server: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    """Bodies due at 1 KiB/s with 0.5 s of slack; small ones read before the upstream (default)."""
    with edge_with(upstream_server[0].url, **body_edge_options()) as edge:
        yield edge


@pytest.fixture(scope="module")
def streaming_edge(upstream_server: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    """The same, with every body streamed from its first byte (`request_buffer_bytes=0`)."""
    with edge_with(upstream_server[0].url, **body_edge_options(request_buffer_bytes=0)) as edge:
        yield edge


@pytest.fixture(
    params=[
        pytest.param("buffered", id="buffered"),
        pytest.param("streamed-new", id="streamed-on-a-new-upstream-connection"),
        pytest.param("streamed-reused", id="streamed-on-a-reused-upstream-connection"),
    ]
)
def body_edge(request: pytest.FixtureRequest, buffering_edge: RunningEdge, streaming_edge: RunningEdge) -> RunningEdge:
    """A small body read before the upstream is involved, or streamed to it over a new or a
    reused pooled connection."""
    if request.param == "buffered":
        return buffering_edge
    return on_connection(streaming_edge, "new" if request.param == "streamed-new" else "reused")


# -- 1. a connection that says nothing -------------------------------------------------------------


def test_silent_connection_is_closed_without_a_word_at_the_header_timeout(head_edge: RunningEdge) -> None:
    sock = connect(head_edge.port)
    connected = time.monotonic()
    with sock:
        closed, said = closed_without_a_word(sock, wait=HEAD_TIMEOUT + 3.0)
        elapsed = time.monotonic() - connected
    assert closed, "a connection that sent nothing was kept open"
    assert said == b""
    # Counted from the accept, which follows the connect: never sooner than the bound, and
    # not the keep-alive timeout (3 s) either.
    assert_between(elapsed, HEAD_TIMEOUT, "the silent connection was closed")


# -- 2. a head sent slowly -------------------------------------------------------------------------


SLOW_HEAD = b"GET /echo?id=%s HTTP/1.1\r\nHost: edge.test\r\n" + b"".join(
    b"X-Slow-%d: %s\r\n" % (number, b"v" * 20) for number in range(200)
)


@pytest.mark.parametrize(
    ("step", "interval"),
    [(1, 0.05), (32, 0.2), (8, 0.4)],
    ids=["a-byte-every-50ms", "a-line-every-200ms", "bursts-400ms-apart"],
)
def test_slowloris_head_gets_408_at_the_header_timeout_from_the_accept(
    head_edge: RunningEdge, upstream: UpstreamApp, step: int, interval: float
) -> None:
    mark = marker()
    with Client(head_edge.port) as client:
        # Every pause is shorter than the timeout: only a bound on the whole head catches it.
        trickle(client.sock, SLOW_HEAD % mark.encode(), step=step, interval=interval)
        response = client.read_response()
        elapsed = time.monotonic() - client.connected_at
        assert client.closed_by_peer(wait=1.0), "the connection stayed open after the 408"
    assert_error(response, 408, "request_timeout")
    assert response.values("connection") == [b"close"]
    assert_between(elapsed, HEAD_TIMEOUT, "the 408 came")
    time.sleep(0.1)
    assert not seen_by_upstream(upstream, mark), "an incomplete head reached the upstream"


def test_kept_alive_connection_times_the_next_head_from_its_first_byte(
    head_edge: RunningEdge, upstream: UpstreamApp
) -> None:
    mark = marker()
    with Client(head_edge.port) as client:
        assert client.exchange(get("/echo?first")).status == 200
        # Idle for twice the header timeout: idle time is the keep-alive timeout's (3 s).
        assert closed_without_a_word(client.sock, wait=2 * HEAD_TIMEOUT) == (False, b"")
        started = trickle(client.sock, SLOW_HEAD % mark.encode(), step=1, interval=0.05)
        response = client.read_response()
        elapsed = time.monotonic() - started
        assert client.closed_by_peer(wait=1.0)
    assert_error(response, 408, "request_timeout")
    assert response.values("connection") == [b"close"]
    # From the head's first byte: not from the previous response, not the keep-alive timeout.
    assert_between(elapsed, HEAD_TIMEOUT, "the 408 came", late=0.9)
    assert not seen_by_upstream(upstream, mark)


# -- 3. a connection idle between requests ---------------------------------------------------------


KEEP_ALIVE = 0.8


def test_idle_kept_alive_connection_is_closed_after_the_keep_alive_timeout(idle_edge: RunningEdge) -> None:
    with Client(idle_edge.port) as client:
        assert client.exchange(get("/echo")).status == 200
        answered = time.monotonic()
        closed, said = closed_without_a_word(client.sock, wait=KEEP_ALIVE + 3.0)
        elapsed = time.monotonic() - answered
    assert closed, "an idle connection was kept open"
    assert said == b""
    # Neither the header timeout (0.3 s) nor for ever.
    assert_between(elapsed, KEEP_ALIVE, "the idle connection was closed")


def test_crlfs_sent_while_idle_do_not_keep_the_connection_open(idle_edge: RunningEdge) -> None:
    with Client(idle_edge.port) as client:
        assert client.exchange(get("/echo")).status == 200
        answered = time.monotonic()
        # Empty lines before a request line are ignored (RFC 9112 section 2.2): no activity.
        trickle(client.sock, b"\r\n" * 100, step=2, interval=0.1)
        closed, said = closed_without_a_word(client.sock, wait=KEEP_ALIVE + 3.0)
        elapsed = time.monotonic() - answered
    assert closed
    assert said == b"", "empty lines were answered as if they began a request"
    assert_between(elapsed, KEEP_ALIVE, "the connection sending CRLFs was closed")


def test_a_crlf_after_a_body_does_not_start_a_head_clock(idle_edge: RunningEdge) -> None:
    # Old clients send an extra CRLF after a POST body; arriving while the response is on
    # its way, it must leave the connection idle (keep-alive timeout), not half a head (408).
    with Client(idle_edge.port) as client:
        client.send(post_head("/slow?delay=0.3", 5) + b"hello")
        time.sleep(0.1)
        client.send(b"\r\n")
        assert client.read_response().status == 200
        answered = time.monotonic()
        closed, said = closed_without_a_word(client.sock, wait=KEEP_ALIVE + 3.0)
        elapsed = time.monotonic() - answered
    assert closed
    assert said == b"", f"the idle connection was answered: {said[:60]!r}"
    assert_between(elapsed, KEEP_ALIVE, "the connection was closed")


# -- 4. a body sent slowly -------------------------------------------------------------------------


def test_body_trickled_below_the_minimum_rate_gets_408(
    body_edge: RunningEdge, upstream_server: tuple[ServerThread, UpstreamApp]
) -> None:
    server, upstream = upstream_server
    streamed = body_edge.settings.request_buffer_bytes == 0
    path = f"/upload/{marker()}"
    sampler = Sampler(lambda: body_edge.proxy.pool.in_use)
    with Client(body_edge.port) as client:
        client.send(post_head(path, 1000))
        sampler.start()
        # 20 bytes a second, never silent for 50 ms: only the minimum rate (1 KiB/s) catches it.
        started = trickle(client.sock, b"x" * 1000, step=1, interval=0.05)
        response = client.read_response()
        elapsed = time.monotonic() - started
        samples = sampler.stop()
        closed = client.closed_by_peer(wait=3.0)
    if streamed:
        # The body was streaming to the upstream: that exchange is closed, not left waiting.
        assert max(samples) == 1
        assert wait_until(lambda: bool(upstream_disconnects(upstream, path)), 2.0), "the upstream saw no disconnect"
    else:
        # Read before any upstream connection is taken: the pool was never touched.
        assert max(samples) == 0
        assert not seen_by_upstream(upstream, path)
    assert_pool_free(body_edge, server)
    # The pool's only connection is free again: the next request does not wait for it.
    after, took = timed_get(body_edge.port, "/echo?after-trickle")
    assert after.status == 200
    assert took < PROMPT
    assert_error(response, 408, "request_timeout")
    assert response.values("connection") == [b"close"]
    assert closed, "the connection stayed open after the 408"
    # 20 B/s against 1 KiB/s of credit: the 0.5 s of slack runs out after about 0.51 s.
    assert_between(elapsed, BODY_TIMEOUT, "the 408 came")


def test_body_that_stops_gets_408_after_the_body_timeout(
    body_edge: RunningEdge, upstream_server: tuple[ServerThread, UpstreamApp]
) -> None:
    server, upstream = upstream_server
    path = f"/upload/{marker()}"
    with Client(body_edge.port) as client:
        client.send(post_head(path, 1000) + b"x" * 100)
        stopped = time.monotonic()
        response = client.read_response()
        elapsed = time.monotonic() - stopped
    if body_edge.settings.request_buffer_bytes == 0:
        assert wait_until(lambda: bool(upstream_disconnects(upstream, path)), 2.0), "the upstream saw no disconnect"
    assert_pool_free(body_edge, server)
    assert_error(response, 408, "request_timeout")
    assert response.values("connection") == [b"close"]
    assert_between(elapsed, BODY_TIMEOUT, "the 408 came")


@pytest.mark.parametrize(
    "connection",
    [
        pytest.param("new", id="new-upstream-connection"),
        pytest.param("reused", id="reused-upstream-connection"),
    ],
)
def test_large_body_that_stops_after_the_buffer_gets_408(
    buffering_edge: RunningEdge, upstream_server: tuple[ServerThread, UpstreamApp], connection: str
) -> None:
    # With the shipped configuration: the first 64 KiB are read, the rest was to stream.
    server, upstream = upstream_server
    path = f"/upload/{marker()}"
    on_connection(buffering_edge, connection)
    with Client(buffering_edge.port) as client:
        client.send(post_head(path, 200 * 1024) + b"x" * (70 * 1024))
        stopped = time.monotonic()
        response = client.read_response()
        elapsed = time.monotonic() - stopped
    assert wait_until(lambda: bool(upstream_disconnects(upstream, path)), 2.0), "the upstream saw no disconnect"
    assert_pool_free(buffering_edge, server)
    assert_error(response, 408, "request_timeout")
    assert response.values("connection") == [b"close"]
    assert_between(elapsed, BODY_TIMEOUT, "the 408 came")


def test_body_sent_slowly_but_above_the_minimum_rate_completes(
    buffering_edge: RunningEdge, upstream: UpstreamApp
) -> None:
    # 200 KiB at 50 KiB/s: eight times the body timeout in all, never short of credit. (A
    # bound on the whole body's time, instead of its rate, would cut this upload.)
    size = 200 * 1024
    path = f"/upload/{marker()}"
    body = b"".join(pattern_bytes(size))
    with Client(buffering_edge.port, timeout=10.0) as client:
        client.send(post_head(path, size))
        started = time.monotonic()
        for offset in range(0, size, 5 * 1024):
            client.send(body[offset : offset + 5 * 1024])
            time.sleep(0.1)
        response = client.read_response()
        elapsed = time.monotonic() - started
    assert response.status == 200, response.body[:300]
    assert response.json()["body_length"] == size
    assert response.json()["body_sha256"] == pattern_sha256(size)
    assert elapsed > 3.5


def test_expect_100_continue_starts_the_body_clock_when_100_is_sent(
    streaming_edge: RunningEdge, upstream_server: tuple[ServerThread, UpstreamApp]
) -> None:
    server, _ = upstream_server
    # The pool's one connection is busy for a second: the edge asks for the body (100
    # Continue) only once it has one, and the client is timed from then, not from its head.
    with Client(streaming_edge.port) as holder, Client(streaming_edge.port) as client:
        holder.send(get(f"/slow?delay=1&id={marker()}"))
        assert wait_until(lambda: streaming_edge.proxy.pool.in_use == 1, 2.0)
        client.send(post_head(f"/upload/{marker()}", 100, "Expect: 100-continue"))
        sent = time.monotonic()
        interim = client.read_response()
        continued = time.monotonic()
        response = client.read_response()
        answered = time.monotonic()
        assert holder.read_response().status == 200
    assert interim.status == 100
    assert continued - sent > 0.7, f"100 Continue came {continued - sent:.3f} s after the head"
    assert_error(response, 408, "request_timeout")
    assert_between(answered - continued, BODY_TIMEOUT, "the 408 came after 100 Continue")
    assert_pool_free(streaming_edge, server)


# -- 5. request buffering --------------------------------------------------------------------------


@dataclass
class Tricklers:
    """`count` clients sending bodies of `length` bytes, `step` bytes every `interval`
    seconds, all from one thread; then each reads its response."""

    port: int
    count: int
    length: int
    step: int
    interval: float
    responses: list[WireResponse | None] = field(default_factory=list)
    last_bytes_at: float = float("inf")  # when the bodies' last bytes started to go out

    def run(self) -> None:
        clients = [Client(self.port, timeout=10.0) for _ in range(self.count)]
        try:
            for number, client in enumerate(clients):
                client.send(post_head(f"/upload/trickle-{number}", self.length))
            sent = 0
            open_clients = list(clients)
            while sent < self.length and open_clients:
                if sent + self.step >= self.length:
                    self.last_bytes_at = time.monotonic()  # from now on, bodies are complete
                for client in list(open_clients):
                    try:
                        client.send(b"y" * self.step)
                    except OSError:
                        open_clients.remove(client)
                sent += self.step
                # An early answer (503) ends that client's sending.
                readable, _, _ = select.select([c.sock for c in open_clients], [], [], 0)
                open_clients = [c for c in open_clients if c.sock not in readable]
                time.sleep(self.interval)
            for client in clients:
                try:
                    self.responses.append(client.read_response())
                except (OSError, EOFError, AssertionError):
                    self.responses.append(None)
        finally:
            for client in clients:
                reset_close(client.sock)


def probe_while(port: int, busy: threading.Thread, interval: float = 0.1) -> list[tuple[WireResponse, float]]:
    """Requests from another address, one after another, while `busy` runs."""
    probes: list[tuple[WireResponse, float]] = []
    while busy.is_alive():
        probes.append(timed_get(port, f"/echo?probe={len(probes)}"))
        time.sleep(interval)
    return probes


def test_slow_small_bodies_hold_no_upstream_connection(upstream_server: tuple[ServerThread, UpstreamApp]) -> None:
    server, upstream = upstream_server
    # 20 clients, each sending 200 bytes at 100 B/s (above the 50 B/s minimum): two seconds
    # of slow senders against a pool of two.
    with edge_with(
        server.url,
        upstream_pool_size=2,
        upstream_connect_timeout=1.0,
        client_body_timeout=5.0,
        client_body_min_rate=50,
        max_exchanges_per_client=64,
    ) as edge:
        tricklers = Tricklers(edge.port, count=20, length=200, step=10, interval=0.1)
        thread = threading.Thread(target=tricklers.run, daemon=True)
        sampler = Sampler(lambda: edge.proxy.pool.in_use)
        sampler.start()
        thread.start()
        time.sleep(0.2)
        probes = probe_while(edge.port, thread)
        thread.join()
        sampler.stop()
        trickling = sampler.before(tricklers.last_bytes_at)
        assert_pool_free(edge, server)
    assert len(probes) >= 5
    slow = [(response.status, round(took, 3)) for response, took in probes if response.status != 200 or took >= PROMPT]
    assert slow == [], f"requests from another client were refused or slow while bodies trickled: {slow}"
    # While the bodies trickled, the pool served only the probes, one at a time; the uploads
    # took it once complete, and all went through.
    assert len(trickling) > 100
    assert max(trickling) <= 1, f"slow senders held upstream connections: {max(trickling)} in use"
    assert [response.status if response else None for response in tricklers.responses] == [200] * 20
    lengths = {r.body_length for r in list(upstream.record.requests) if r.raw_path.startswith(b"/upload/trickle-")}
    assert lengths == {200}


def test_without_request_buffering_slow_bodies_hold_the_pool(upstream_server: tuple[ServerThread, UpstreamApp]) -> None:
    # The contrast: the same slow senders with every body streamed (`request_buffer_bytes=0`).
    # Two of them hold both pooled connections for as long as they take to send; everybody
    # else waits for the pool and is turned away. This is why small bodies are buffered.
    server, _ = upstream_server
    with edge_with(
        server.url,
        upstream_pool_size=2,
        upstream_connect_timeout=1.0,
        client_body_timeout=5.0,
        client_body_min_rate=50,
        max_exchanges_per_client=64,
        request_buffer_bytes=0,
    ) as edge:
        tricklers = Tricklers(edge.port, count=20, length=200, step=10, interval=0.1)
        thread = threading.Thread(target=tricklers.run, daemon=True)
        thread.start()
        assert wait_until(lambda: edge.proxy.pool.in_use == 2, 2.0)
        response, took = timed_get(edge.port, "/echo?probe")
        held = edge.proxy.pool.in_use
        thread.join()
        assert_pool_free(edge, server)
    assert held == 2
    # Turned away after waiting the connect timeout for a pooled connection.
    assert_error(response, 503, "upstream_busy")
    assert response.values("retry-after") == [b"1"]
    assert took >= 1.0 - EARLY
    busy = [r for r in tricklers.responses if r is not None and r.status == 503]
    assert len(busy) >= 10, [r.status if r else None for r in tricklers.responses]


# -- 6. a client that does not read its response ---------------------------------------------------


DOWNLOAD = "/bytes/16000000"  # far more than the socket buffers hold


def test_non_reading_client_is_cut_after_the_write_timeout_and_frees_the_upstream(
    upstream_server: tuple[ServerThread, UpstreamApp],
) -> None:
    server, _ = upstream_server
    with edge_with(server.url, upstream_pool_size=1, client_write_timeout=WRITE_TIMEOUT) as edge:
        pool = edge.proxy.pool
        sock = connect(edge.port, rcvbuf=4096)
        with contextlib.closing(sock):
            sock.sendall(get(DOWNLOAD))
            sent = time.monotonic()
            assert wait_until(lambda: pool.in_use == 1, 2.0)
            assert wait_until(lambda: pool.in_use == 0, WRITE_TIMEOUT + 5.0), "the upstream connection is still held"
            freed = time.monotonic() - sent
            received = 0
            with contextlib.suppress(ConnectionResetError):
                sock.settimeout(2.0)
                while chunk := sock.recv(1 << 20):
                    received += len(chunk)
        assert_pool_free(edge, server)
        response, took = timed_get(edge.port, "/echo?after-non-reader")
    # Never before the client has left the data untaken for the whole write timeout.
    assert_between(freed, WRITE_TIMEOUT, "the upstream connection was freed", late=2.0)
    assert received < 16_000_000, "the whole download arrived: the client was never cut"
    assert response.status == 200
    assert took < PROMPT


def test_slow_but_reading_client_is_not_cut(upstream_server: tuple[ServerThread, UpstreamApp]) -> None:
    # The write timeout counts time without progress, not time until the edge's buffer has
    # drained: a client taking 16 KiB every 50 ms keeps a paused edge waiting as long as it
    # reads, here four times the write timeout and more.
    server, _ = upstream_server
    size = 1024 * 1024
    with edge_with(server.url, upstream_pool_size=1, client_write_timeout=WRITE_TIMEOUT) as edge:
        # Accepted sockets inherit the listener's send buffer: kept small, it is the edge's
        # own buffer (hundreds of KiB at a pause) that the client drains, not the kernel's.
        edge.server.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        with contextlib.closing(connect(edge.port, rcvbuf=8192)) as sock:
            sock.sendall(get(f"/bytes/{size}"))
            started = time.monotonic()
            head = b""
            digest = hashlib.sha256()
            received = 0
            with contextlib.suppress(ConnectionResetError):
                while b"\r\n\r\n" not in head and (chunk := sock.recv(16384)):
                    head += chunk
                head, _, rest = head.partition(b"\r\n\r\n")
                digest.update(rest)
                received = len(rest)
                while received < size and (chunk := sock.recv(16384)):
                    digest.update(chunk)
                    received += len(chunk)
                    time.sleep(0.05)
            elapsed = time.monotonic() - started
        assert_pool_free(edge, server)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert received == size, f"cut after {received} bytes, {elapsed:.2f} s"
    assert digest.hexdigest() == pattern_sha256(size)
    assert elapsed > 4 * WRITE_TIMEOUT


def test_client_reading_below_the_minimum_rate_is_cut(upstream_server: tuple[ServerThread, UpstreamApp]) -> None:
    # A few bytes per write timeout is progress, but not enough: with a minimum rate of
    # 64 KiB/s the client must take 32 KiB of what waits for it in each 0.5 s.
    server, _ = upstream_server
    with edge_with(
        server.url, upstream_pool_size=1, client_write_timeout=WRITE_TIMEOUT, client_body_min_rate=64 * 1024
    ) as edge:
        edge.server.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        pool = edge.proxy.pool
        with contextlib.closing(connect(edge.port, rcvbuf=4096)) as sock:
            sock.sendall(get(DOWNLOAD))
            started = time.monotonic()
            received = 0
            with contextlib.suppress(ConnectionResetError, TimeoutError):
                sock.settimeout(WRITE_TIMEOUT + 5.0)
                while (chunk := sock.recv(512)) and time.monotonic() - started < 8 * WRITE_TIMEOUT + 5.0:
                    received += len(chunk)
                    time.sleep(0.05)  # about 10 KiB/s
            elapsed = time.monotonic() - started
        assert_pool_free(edge, server)
    assert pool.in_use == 0
    assert received < 16_000_000
    assert elapsed < 8 * WRITE_TIMEOUT + 5.0, "the slow reader was never cut"


def test_ten_non_reading_clients_do_not_block_others_beyond_the_write_timeout(
    upstream_server: tuple[ServerThread, UpstreamApp],
) -> None:
    server, _ = upstream_server
    # A pool of four against ten clients that never read: they hold it in waves of about the
    # write timeout each; another client is served after two of them, not turned away after
    # the connect timeout (5 s) as it would be if they held the pool for ever.
    with edge_with(
        server.url, upstream_pool_size=4, upstream_connect_timeout=5.0, client_write_timeout=WRITE_TIMEOUT
    ) as edge:
        pool = edge.proxy.pool
        socks = [connect(edge.port, rcvbuf=4096) for _ in range(10)]
        try:
            for sock in socks:
                sock.sendall(get(DOWNLOAD))
            assert wait_until(lambda: pool.in_use == 4, 2.0)
            response, took = timed_get(edge.port, "/echo?behind-non-readers")
            assert wait_until(lambda: pool.in_use == 0, 3 * WRITE_TIMEOUT + 3.0)
        finally:
            for sock in socks:
                reset_close(sock)
        assert_pool_free(edge, server)
    assert response.status == 200
    # Queued behind six of them, it gets a connection once two waves have been cut.
    assert took < 2 * WRITE_TIMEOUT + LATE, f"served after {took:.3f} s"


# -- 7. connections per address --------------------------------------------------------------------


def test_connections_beyond_the_per_address_cap_are_closed_at_once(
    upstream_server: tuple[ServerThread, UpstreamApp],
) -> None:
    with edge_with(upstream_server[0].url, max_connections_per_client=5, client_keep_alive_timeout=10.0) as edge:
        held = [Client(edge.port) for _ in range(5)]
        try:
            # Each has been served, so each is counted.
            for client in held:
                assert client.exchange(get("/echo")).status == 200
            sixth = connect(edge.port)
            with sixth:
                with contextlib.suppress(OSError):
                    sixth.sendall(get("/echo?sixth"))
                started = time.monotonic()
                closed, said = closed_without_a_word(sixth, wait=2.0)
                elapsed = time.monotonic() - started
            assert closed, "a sixth connection from one address was kept"
            assert said == b""
            assert elapsed < PROMPT
            # Another address is not affected, nor are the five.
            response, _ = timed_get(edge.port, "/echo?other-address")
            assert response.status == 200
            assert held[0].exchange(get("/echo?still")).status == 200
            # One leaves: its slot is free for the next.
            held.pop().sock.close()

            def a_new_one_is_served() -> bool:
                with Client(edge.port, timeout=2.0) as client:
                    try:
                        return client.exchange(get("/echo?freed")).status == 200
                    except (OSError, EOFError):
                        return False

            assert wait_until(a_new_one_is_served, 3.0, interval=0.05)
        finally:
            for client in held:
                client.sock.close()


def test_trusted_proxies_are_not_capped_but_other_addresses_are(
    upstream_server: tuple[ServerThread, UpstreamApp],
) -> None:
    with edge_with(
        upstream_server[0].url,
        max_connections_per_client=3,
        trusted_proxies=["127.0.0.1/32"],
        client_keep_alive_timeout=10.0,
    ) as edge:
        clients: list[Client] = []
        try:
            # A balancer: all its clients' connections come from its one address.
            for number in range(8):
                clients.append(Client(edge.port))
                response = clients[-1].exchange(get("/echo", f"X-Forwarded-For: 198.51.100.{number + 1}"))
                assert response.status == 200, f"connection {number + 1} from the trusted proxy: {response.status}"
            # An untrusted address is still capped at three.
            clients += [Client(edge.port, OTHER) for _ in range(3)]
            for client in clients[-3:]:
                assert client.exchange(get("/echo")).status == 200
            with connect(edge.port, OTHER) as fourth:
                with contextlib.suppress(OSError):
                    fourth.sendall(get("/echo"))
                closed, said = closed_without_a_word(fourth, wait=2.0)
            assert closed
            assert said == b""
        finally:
            for client in clients:
                client.sock.close()


# -- 8. exchanges per client -----------------------------------------------------------------------


def test_exchanges_beyond_the_per_client_cap_get_429_at_once(upstream_server: tuple[ServerThread, UpstreamApp]) -> None:
    server, upstream = upstream_server
    with edge_with(server.url, max_exchanges_per_client=3, client_body_timeout=5.0) as edge:
        slow = [Client(edge.port) for _ in range(3)]
        try:
            marks = [marker() for _ in slow]
            for client, mark in zip(slow, marks, strict=True):
                client.send(get(f"/slow?delay=1&id={mark}"))
            assert wait_until(lambda: all(seen_by_upstream(upstream, mark) for mark in marks), 2.0)
            # One more, with a body it never sends: refused before the body is waited for.
            refused_mark = marker()
            with Client(edge.port) as fourth:
                started = time.monotonic()
                response = fourth.exchange(post_head(f"/echo?id={refused_mark}", 1000))
                took = time.monotonic() - started
            error = assert_error(response, 429, "too_many_concurrent_requests")
            assert error["message"] == "Too many requests at once from this client. Retry in 1 second."
            assert response.values("retry-after") == [b"1"]
            assert took < PROMPT
            assert not seen_by_upstream(upstream, refused_mark)
            # Another client is served meanwhile.
            other, other_took = timed_get(edge.port, "/echo?other-client")
            assert other.status == 200
            assert other_took < PROMPT
            assert [client.read_response().status for client in slow] == [200, 200, 200]
        finally:
            for client in slow:
                client.sock.close()
        # Once they are answered, the client may send again.
        with Client(edge.port) as again:
            assert again.exchange(get("/echo?again")).status == 200


def test_exchange_cap_behind_a_trusted_proxy_counts_each_forwarded_client(
    upstream_server: tuple[ServerThread, UpstreamApp],
) -> None:
    server, upstream = upstream_server
    with edge_with(
        server.url, max_exchanges_per_client=2, trusted_proxies=["127.0.0.1/32"], client_body_timeout=5.0
    ) as edge:
        first = "X-Forwarded-For: 203.0.113.7"
        second = "X-Forwarded-For: 203.0.113.8"
        slow = [Client(edge.port) for _ in range(4)]
        try:
            marks = [marker() for _ in slow]
            # Four slow exchanges from the proxy's one address: two per forwarded client.
            for number, (client, mark) in enumerate(zip(slow, marks, strict=True)):
                client.send(get(f"/slow?delay=1&id={mark}", first if number < 2 else second))
            assert wait_until(lambda: all(seen_by_upstream(upstream, mark) for mark in marks), 2.0)
            with Client(edge.port) as third:
                started = time.monotonic()
                response = third.exchange(get("/echo?third", first))
                took = time.monotonic() - started
            error = assert_error(response, 429, "too_many_concurrent_requests")
            assert error["message"] == "Too many requests at once from this client. Retry in 1 second."
            assert response.values("retry-after") == [b"1"]
            assert took < PROMPT
            # An untrusted peer naming the same client is not believed: it is itself.
            response, _ = timed_get(edge.port, "/echo?untrusted", first)
            assert response.status == 200
            assert [client.read_response().status for client in slow] == [200] * 4
        finally:
            for client in slow:
                client.sock.close()


# -- 9. one address against everybody else ---------------------------------------------------------


@dataclass
class Attack:
    """One address keeps `slots` slow exchanges going for `duration` seconds: heads and small
    bodies trickled a byte at a time, requests the upstream answers slowly, downloads never
    read. A connection the edge closes is opened again at the next tick."""

    port: int
    slots: int
    duration: float
    tick: float = 0.2
    opened: int = 0
    refused: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    KINDS = ("head", "body", "slow", "unread")

    def _open(self, kind: str, number: int) -> socket.socket | None:
        try:
            sock = connect(self.port, timeout=2.0, rcvbuf=4096 if kind == "unread" else None)
            if kind == "head":
                sock.sendall(b"GET /echo?attack=%d HTTP/1.1\r\n" % number)
            elif kind == "body":
                sock.sendall(post_head(f"/upload/attack-{number}", 5000))
            elif kind == "slow":
                sock.sendall(get(f"/slow?delay=10&attack={number}"))
            else:
                sock.sendall(get(f"/bytes/8000000?attack={number}"))
        except OSError as exc:
            self.errors.append(repr(exc))
            return None
        sock.setblocking(False)
        self.opened += 1
        return sock

    def _closed(self, sock: socket.socket, kind: str) -> bool:
        """Reads what the edge said; True if the connection is over."""
        if kind == "unread":
            # Never read: only a reset (the write timeout's cut) ends it.
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return False
        except OSError:
            self.refused += 1
            return True
        if not data:
            self.refused += 1
            return True
        if data.startswith(b"HTTP/1.1 "):
            status = int(data[9:12])
            self.statuses[status] = self.statuses.get(status, 0) + 1
        return True

    def run(self) -> None:
        socks: list[socket.socket | None] = [None] * self.slots
        kinds = [self.KINDS[number % len(self.KINDS)] for number in range(self.slots)]
        deadline = time.monotonic() + self.duration
        try:
            while time.monotonic() < deadline:
                for number, kind in enumerate(kinds):
                    sock = socks[number]
                    if sock is not None and self._closed(sock, kind):
                        reset_close(sock)
                        sock = None
                    if sock is None:
                        socks[number] = self._open(kind, number)
                    elif kind in ("head", "body"):
                        with contextlib.suppress(OSError):
                            sock.send(b"a")
                time.sleep(self.tick)
        finally:
            for sock in socks:
                if sock is not None:
                    reset_close(sock)


def test_one_address_with_hundreds_of_slow_exchanges_does_not_starve_another(
    upstream_server: tuple[ServerThread, UpstreamApp],
) -> None:
    server, _ = upstream_server
    # A pool far smaller than the attack (24 against 200); the caps and timeouts as shipped
    # except for their length. Without them the attack would hold every pooled connection
    # and the other client would be turned away (503 after the 2 s connect timeout).
    with edge_with(
        server.url,
        upstream_pool_size=24,
        upstream_connect_timeout=2.0,
        client_header_timeout=1.0,
        client_body_timeout=1.0,
        client_write_timeout=1.0,
    ) as edge:
        attack = Attack(edge.port, slots=200, duration=3.0)
        thread = threading.Thread(target=attack.run, daemon=True)
        sampler = Sampler(lambda: edge.proxy.pool.in_use)
        sampler.start()
        thread.start()
        time.sleep(0.5)  # the attack is under way
        probes = probe_while(edge.port, thread)
        thread.join()
        in_use = sampler.stop()
        assert_pool_free(edge, server, timeout=5.0)
    assert len(probes) >= 10, f"only {len(probes)} requests in the attack's 2.5 s"
    slow = [(response.status, round(took, 3)) for response, took in probes if response.status != 200 or took >= PROMPT]
    assert slow == [], f"the other client was refused or slow: {slow} (of {len(probes)})"
    # The attack was real and met every bound: it held upstream connections, never more than
    # its 16 exchanges (one more is a probe's; trickled bodies count against the cap too, so
    # fewer), connections were refused at accept, heads and bodies timed out, exchanges over
    # the cap were refused.
    assert 4 <= max(in_use) <= 16 + 1, max(in_use)
    assert attack.opened >= 200, attack
    assert attack.refused > 0, attack
    assert attack.statuses.get(408, 0) > 0, attack
    assert attack.statuses.get(429, 0) > 0, attack
