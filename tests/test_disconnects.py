"""Clients that go away: the upstream exchange ends at once and no pooled connection leaks.

Three ways to leave - mid-request (headers and part of a large body, then gone), mid-response
(part of a large download read, then gone) and while waiting (the upstream has not answered
yet) - each checked on its own, then a thousand of them mixed and concurrent against an edge
with a small pool. A leaked connection would stay counted in `pool.in_use`, stay open at the
upstream, and after enough of them exhaust the pool into 503s.

The upstream is a real uvicorn server of this module's own, so the connections open at it
are the edge's alone.
"""

from __future__ import annotations

import random
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.servers import RunningEdge, ServerThread, UpstreamApp, running_edge, start_upstream, wait_until

POOL_SIZE = 8
PROMPT = 0.5  # how soon after the client leaves the upstream must see the exchange end


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def close(sock: socket.socket, *, reset: bool) -> None:
    """Leaves: with a FIN, or with an RST (SO_LINGER 0) as a crashed client would."""
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[tuple[ServerThread, UpstreamApp]]:
    server, app = start_upstream()
    yield server, app
    server.stop()


@pytest.fixture(scope="module")
def small_edge(upstream_server: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    with running_edge(upstream_server[0].url, upstream_pool_size=POOL_SIZE, upstream_connect_timeout=1.0) as edge:
        yield edge


def upstream_connections(server: ServerThread) -> int:
    """Connections open at the upstream right now, as its server counts them."""
    return len(server.server.server_state.connections)


def assert_nothing_leaked(edge: RunningEdge, server: ServerThread, timeout: float = 2.0) -> None:
    pool = edge.proxy.pool
    assert wait_until(lambda: pool.in_use == 0, timeout), f"{pool.in_use} upstream connections still in use"
    # Every connection still open at the upstream must be an idle one in the pool.
    assert wait_until(lambda: upstream_connections(server) <= pool.idle, timeout), (
        f"{upstream_connections(server)} connections open at the upstream, {pool.idle} idle in the pool"
    )


def new_disconnects(upstream: UpstreamApp, path: str, since: float) -> list[float]:
    return [at for seen_path, at in list(upstream.record.disconnects) if seen_path == path and at >= since]


# -- one of each --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_client_gone_while_waiting_ends_the_upstream_exchange_at_once(
    small_edge: RunningEdge, upstream_server: tuple[ServerThread, UpstreamApp], reset: bool
) -> None:
    server, upstream = upstream_server
    marker = uuid.uuid4().hex
    sock = connect(small_edge.port)
    sock.sendall(f"GET /slow?delay=5&id={marker} HTTP/1.1\r\nHost: edge\r\n\r\n".encode())
    assert wait_until(lambda: any(marker.encode() in r.query_string for r in upstream.record.requests), 3.0)
    time.sleep(0.05)  # the upstream is now waiting to answer
    closed_at = time.monotonic()
    close(sock, reset=reset)
    assert wait_until(lambda: bool(new_disconnects(upstream, "/slow", closed_at)), 3.0), (
        "the upstream never saw the client leave"
    )
    delay = new_disconnects(upstream, "/slow", closed_at)[0] - closed_at
    assert delay <= PROMPT, f"the upstream saw the disconnect {delay:.3f} s after the client left"
    assert_nothing_leaked(small_edge, server)


def test_client_gone_while_waiting_on_a_reused_connection_is_never_sent_again(
    upstream_server: tuple[ServerThread, UpstreamApp],
) -> None:
    # The edge's own close of the upstream exchange once used to pass for a stale keep-alive
    # connection, and an idempotent request was then sent a second time, to nobody.
    server, upstream = upstream_server
    with running_edge(server.url, upstream_pool_size=1) as edge:
        assert httpx.get(f"{edge.url}/echo", timeout=5).status_code == 200  # one idle pooled connection
        marker = uuid.uuid4().hex
        sock = connect(edge.port)
        sock.sendall(f"GET /slow?delay=2&id={marker} HTTP/1.1\r\nHost: edge\r\n\r\n".encode())
        assert wait_until(lambda: any(marker.encode() in r.query_string for r in upstream.record.requests), 3.0)
        time.sleep(0.3)
        close(sock, reset=False)
        time.sleep(1.0)
        sent = [r for r in upstream.record.requests if marker.encode() in r.query_string]
        assert len(sent) == 1, f"the upstream got the request {len(sent)} times"
        assert_nothing_leaked(edge, server)


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_client_gone_mid_request_body_ends_the_upstream_exchange_at_once(
    small_edge: RunningEdge, upstream_server: tuple[ServerThread, UpstreamApp], reset: bool
) -> None:
    server, upstream = upstream_server
    path = f"/upload/{uuid.uuid4().hex}"
    sock = connect(small_edge.port)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: edge\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: 1000000\r\n\r\n".encode()
        + b"x" * 64 * 1024
    )
    # The edge streams the body: the upstream holds the exchange open, waiting for the rest.
    assert wait_until(lambda: small_edge.proxy.pool.in_use == 1, 3.0)
    time.sleep(0.1)
    closed_at = time.monotonic()
    close(sock, reset=reset)
    assert wait_until(lambda: bool(new_disconnects(upstream, path, closed_at)), 3.0), (
        "the upstream never saw the client leave"
    )
    delay = new_disconnects(upstream, path, closed_at)[0] - closed_at
    assert delay <= PROMPT, f"the upstream saw the disconnect {delay:.3f} s after the client left"
    recorded = [r for r in upstream.record.requests if r.raw_path == path.encode()]
    assert len(recorded) == 1
    assert 0 < recorded[0].body_length < 1_000_000
    assert_nothing_leaked(small_edge, server)


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_client_gone_mid_response_ends_the_upstream_exchange_at_once(
    small_edge: RunningEdge, upstream_server: tuple[ServerThread, UpstreamApp], reset: bool
) -> None:
    server, _ = upstream_server
    pool = small_edge.proxy.pool
    # A gigabyte: relaying the rest into the void instead of stopping would take about a second.
    sock = connect(small_edge.port)
    sock.sendall(b"GET /bytes/1000000000 HTTP/1.1\r\nHost: edge\r\n\r\n")
    received = 0
    while received < 1024 * 1024:
        chunk = sock.recv(65536)
        assert chunk, "the edge ended the download early"
        received += len(chunk)
    # The client stops reading; backpressure holds the upstream mid-body.
    time.sleep(0.2)
    assert pool.in_use == 1
    open_during = upstream_connections(server)
    closed_at = time.monotonic()
    close(sock, reset=reset)
    # The download's upstream connection is closed, not drained and kept for reuse.
    assert wait_until(lambda: pool.in_use == 0 and upstream_connections(server) == open_during - 1, 3.0), (
        f"in use {pool.in_use}, open at the upstream {upstream_connections(server)} (was {open_during})"
    )
    delay = time.monotonic() - closed_at
    assert delay <= PROMPT, f"the upstream connection was closed {delay:.3f} s after the client left"
    assert_nothing_leaked(small_edge, server)


# -- a thousand of them --------------------------------------------------------------------------------


def abort_mid_request(port: int, rng: random.Random) -> None:
    with connect(port) as sock:
        sock.sendall(
            f"POST /upload/aborted-{rng.randrange(10**9)} HTTP/1.1\r\nHost: edge\r\n"
            f"Content-Length: 1000000\r\n\r\n".encode()
            + b"x" * rng.choice([0, 1, 4096, 65536])
        )
        time.sleep(rng.uniform(0, 0.02))
        close(sock, reset=rng.random() < 0.5)


def abort_mid_response(port: int, rng: random.Random) -> None:
    with connect(port, timeout=3.0) as sock:
        sock.sendall(b"GET /bytes/50000000 HTTP/1.1\r\nHost: edge\r\n\r\n")
        wanted = rng.choice([1, 1024, 65536, 512 * 1024])
        received = 0
        try:
            while received < wanted:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += len(chunk)
        except OSError:
            pass
        close(sock, reset=rng.random() < 0.5)


def abort_while_waiting(port: int, rng: random.Random) -> None:
    with connect(port) as sock:
        sock.sendall(b"GET /slow?delay=5 HTTP/1.1\r\nHost: edge\r\n\r\n")
        time.sleep(rng.uniform(0, 0.03))
        close(sock, reset=rng.random() < 0.5)


ABORTS = (abort_mid_request, abort_mid_response, abort_while_waiting)


def test_a_thousand_aborted_requests_leak_nothing(
    small_edge: RunningEdge, upstream_server: tuple[ServerThread, UpstreamApp]
) -> None:
    server, _ = upstream_server
    pool = small_edge.proxy.pool

    def run(number: int) -> None:
        rng = random.Random(number)
        ABORTS[number % len(ABORTS)](small_edge.port, rng)

    with ThreadPoolExecutor(max_workers=32) as executor:
        for result in executor.map(run, range(1000)):
            assert result is None

    assert_nothing_leaked(small_edge, server, timeout=3.0)
    assert pool.idle <= POOL_SIZE

    # A leak would have used up the eight connections: ordinary requests would get 503.
    def ordinary(number: int) -> int:
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            return client.get(f"{small_edge.url}/echo?after-aborts={number}").status_code

    with ThreadPoolExecutor(max_workers=20) as executor:
        statuses = list(executor.map(ordinary, range(20)))
    assert statuses == [200] * 20
    assert_nothing_leaked(small_edge, server)
