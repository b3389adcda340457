"""Size limits at the edge: bodies (413) and request headers (431), enforced without
buffering and without troubling the upstream.

Requests whose timing matters (a head sent without its body, a chunked body that stops
half-way) are written on a raw socket; the upstream's record tells what reached it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from edge.policy import Policy, RouteRule
from tests.concerns_support import RawConnection, assert_envelope, header_pairs, request_head, unique_path
from tests.servers import RunningEdge, ServerThread, UpstreamApp, pattern_bytes, running_edge, wait_until

LIMIT = 64 * 1024
HEADER_COUNT_LIMIT = 20
HEADER_BYTES_LIMIT = 2048
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def limited_edge(upstream_server: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    with running_edge(
        upstream_server[0].url,
        max_body_bytes=LIMIT,
        max_header_count=HEADER_COUNT_LIMIT,
        max_header_bytes=HEADER_BYTES_LIMIT,
        # Bodies up to the limit and past it are read before the upstream hears of them.
        request_buffer_bytes=4 * LIMIT,
    ) as edge:
        yield edge


@pytest.fixture(scope="module")
def streaming_limited_edge(upstream_server: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    """The same limit with request buffering off: every body streams to the upstream."""
    with running_edge(upstream_server[0].url, max_body_bytes=LIMIT, request_buffer_bytes=0) as edge:
        yield edge


@pytest.fixture(scope="module")
def turns_edge(upstream_server: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    policy = Policy(routes=[RouteRule(name="voice-turns", path="/api/v1/sessions/*/turns", max_body_bytes=10 * MiB)])
    with running_edge(upstream_server[0].url, policy, max_body_bytes=1 * MiB) as edge:
        yield edge


def recorded(upstream: UpstreamApp, path: str) -> list[int]:
    """The body lengths of the requests to `path` the upstream finished reading (or gave up on)."""
    return [request.body_length for request in upstream.record.requests if request.raw_path == path.encode()]


def declared_only(edge: RunningEdge, path: str, length: int, *, expect_continue: bool) -> float:
    """Sends a request head declaring `length` body bytes, and never the body; checks that the
    answer is an immediate 413 and a closed connection, and returns how long it took."""
    headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(length))]
    if expect_continue:
        headers.append(("Expect", "100-continue"))
    with RawConnection(edge.port) as connection:
        started = time.monotonic()
        connection.send(request_head("POST", path, headers))
        response = connection.read_response()
        elapsed = time.monotonic() - started
        assert response.status != 100, "100 Continue invites a body the edge will refuse"
        assert response.status == 413, response.body
        assert response.values("connection") == ["close"]
        assert_envelope(413, response.headers, response.body, "payload_too_large")
        assert connection.closed_by_peer(), "the edge should close rather than wait for the body"
        assert connection.buffer == b"", "nothing may follow the 413"
    return elapsed


# -- declared lengths -------------------------------------------------------------------------------


@pytest.mark.parametrize("expect_continue", [True, False], ids=["expect-100-continue", "plain"])
def test_declared_length_over_the_limit_is_413_at_once_and_never_forwarded(
    limited_edge: RunningEdge, upstream: UpstreamApp, expect_continue: bool
) -> None:
    path = unique_path()
    elapsed = declared_only(limited_edge, path, LIMIT + 1, expect_continue=expect_continue)
    assert elapsed < 1.0
    assert recorded(upstream, path) == []
    assert not any(disconnect[0] == path for disconnect in upstream.record.disconnects)


def test_declared_length_within_the_limit_is_invited_and_forwarded(
    limited_edge: RunningEdge, upstream: UpstreamApp
) -> None:
    # The other side of the test above: the same raw client does see 100 Continue, so its
    # absence there means something.
    path = unique_path()
    head = request_head("POST", path, [("Content-Length", "5"), ("Expect", "100-continue")])
    with RawConnection(limited_edge.port) as connection:
        connection.send(head)
        interim = connection.read_response()
        assert interim.status == 100
        connection.send(b"hello")
        response = connection.read_response()
    assert response.status == 200
    assert response.json()["body_length"] == 5
    assert recorded(upstream, path) == [5]


def test_body_exactly_at_the_limit_passes(limited_edge: RunningEdge, upstream: UpstreamApp) -> None:
    path = unique_path()
    response = httpx.post(limited_edge.url + path, content=b"x" * LIMIT, timeout=10)
    assert response.status_code == 200
    assert response.json()["body_length"] == LIMIT
    assert recorded(upstream, path) == [LIMIT]


def test_chunked_body_exactly_at_the_limit_passes(limited_edge: RunningEdge, upstream: UpstreamApp) -> None:
    path = unique_path()
    response = httpx.post(limited_edge.url + path, content=pattern_bytes(LIMIT, chunk=4096), timeout=10)
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert response.status_code == 200
    assert response.json()["body_length"] == LIMIT
    assert recorded(upstream, path) == [LIMIT]


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_client_sending_an_oversized_body_anyway_still_gets_the_413(
    limited_edge: RunningEdge, upstream: UpstreamApp, framing: str
) -> None:
    # A client that does not wait for 100 Continue writes its whole body; the edge does not
    # read it, yet the client must still be able to read the answer.
    path = unique_path()
    size = 4 * MiB
    body = b"".join(pattern_bytes(size)) if framing == "length" else pattern_bytes(size, chunk=16384)
    response = httpx.post(limited_edge.url + path, content=body, timeout=10)
    assert response.status_code == 413
    assert_envelope(413, header_pairs(response), response.content, "payload_too_large")
    assert all(length <= LIMIT for length in recorded(upstream, path))


# -- chunked bodies ---------------------------------------------------------------------------------


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def send_chunks_past_the_limit(edge: RunningEdge, path: str) -> tuple[int, float]:
    """Streams a chunked body past LIMIT without ever ending it; checks the 413 and the closed
    connection, and returns the bytes sent and how long the answer took after the last one."""
    head = request_head("POST", path, [("Transfer-Encoding", "chunked")])
    piece = b"y" * 8192
    sent = 0
    with RawConnection(edge.port) as connection:
        connection.send(head + chunk(piece))
        sent += len(piece)
        time.sleep(0.2)  # the head and the first chunk are on their way
        while sent <= LIMIT:
            connection.send(chunk(piece))
            sent += len(piece)
        # No terminating chunk: the client could go on sending; the edge must not wait.
        started = time.monotonic()
        response = connection.read_response()
        elapsed = time.monotonic() - started
        assert response.status == 413, response.body
        assert response.values("connection") == ["close"]
        assert_envelope(413, response.headers, response.body, "payload_too_large")
        assert connection.closed_by_peer()
    return sent, elapsed


def test_chunked_body_growing_past_the_limit_is_413_and_the_upstream_exchange_is_aborted(
    streaming_limited_edge: RunningEdge, upstream: UpstreamApp
) -> None:
    path = unique_path("/upload")
    sent, elapsed = send_chunks_past_the_limit(streaming_limited_edge, path)
    assert elapsed < 1.0
    assert wait_until(lambda: any(gone[0] == path for gone in upstream.record.disconnects), 3), (
        "the upstream never saw its exchange end early"
    )
    lengths = recorded(upstream, path)
    assert all(length <= LIMIT for length in lengths), f"the upstream got more than the limit: {lengths}"
    assert sent not in lengths


def test_chunked_body_past_the_limit_within_the_request_buffer_never_reaches_the_upstream(
    limited_edge: RunningEdge, upstream: UpstreamApp
) -> None:
    # The edge reads up to EDGE_REQUEST_BUFFER_BYTES (here above the limit) before it opens
    # the upstream exchange.
    path = unique_path("/upload")
    _, elapsed = send_chunks_past_the_limit(limited_edge, path)
    assert elapsed < 1.0
    time.sleep(0.2)
    assert recorded(upstream, path) == []


# -- per-route limits -------------------------------------------------------------------------------


def test_route_rule_raises_the_limit_for_its_route_only(turns_edge: RunningEdge, upstream: UpstreamApp) -> None:
    size = 2 * MiB
    path = "/api/v1/sessions/" + unique_path("").strip("/") + "/turns"
    response = httpx.post(turns_edge.url + path, content=b"".join(pattern_bytes(size)), timeout=10)
    assert response.status_code == 200
    assert response.json()["body_length"] == size
    assert recorded(upstream, path) == [size]

    for elsewhere in (
        unique_path("/api/v1/sessions/abc/history"),  # another route: the 1 MiB default
        "/api/v1/sessions/a/b/turns" + unique_path(""),  # not matched: * is one segment
        path.replace("/turns", "/turns-extra"),
    ):
        declared_only(turns_edge, elsewhere, size, expect_continue=False)
        assert recorded(upstream, elsewhere) == []


def test_route_rule_limit_is_still_a_limit(turns_edge: RunningEdge, upstream: UpstreamApp) -> None:
    path = "/api/v1/sessions/" + unique_path("").strip("/") + "/turns"
    declared_only(turns_edge, path, 10 * MiB + 1, expect_continue=True)
    assert recorded(upstream, path) == []


# -- headers ----------------------------------------------------------------------------------------


def test_too_many_headers_is_431_and_never_forwarded(limited_edge: RunningEdge, upstream: UpstreamApp) -> None:
    path = unique_path()
    headers = [(f"X-Filler-{number}", "x") for number in range(HEADER_COUNT_LIMIT + 1)]
    with RawConnection(limited_edge.port) as connection:
        connection.send(request_head("GET", path, headers))
        response = connection.read_response()
        assert response.status == 431
        assert response.values("connection") == ["close"]
        assert_envelope(431, response.headers, response.body, "headers_too_large")
    assert recorded(upstream, path) == []


def test_the_count_is_of_the_clients_own_fields(limited_edge: RunningEdge, upstream: UpstreamApp) -> None:
    # Exactly the limit, Host included: the fields the edge adds on the way (X-Request-ID,
    # traceparent) must not push the request over it.
    path = unique_path()
    headers = [(f"X-Filler-{number}", "x") for number in range(HEADER_COUNT_LIMIT - 1)]
    with RawConnection(limited_edge.port) as connection:
        connection.send(request_head("GET", path, headers))
        response = connection.read_response()
    assert response.status == 200, response.body
    assert recorded(upstream, path) == [0]


def test_too_many_header_bytes_is_431_and_never_forwarded(limited_edge: RunningEdge, upstream: UpstreamApp) -> None:
    path = unique_path()
    with RawConnection(limited_edge.port) as connection:
        connection.send(request_head("GET", path, [("X-Big", "b" * HEADER_BYTES_LIMIT)]))
        response = connection.read_response()
        assert response.status == 431
        assert response.values("connection") == ["close"]
        assert_envelope(431, response.headers, response.body, "headers_too_large")
    assert recorded(upstream, path) == []


def test_headers_within_the_limits_pass(limited_edge: RunningEdge, upstream: UpstreamApp) -> None:
    path = unique_path()
    headers = [(f"X-Filler-{number}", "x") for number in range(HEADER_COUNT_LIMIT // 2)]
    headers.append(("X-Big", "b" * (HEADER_BYTES_LIMIT // 2)))
    response = httpx.get(limited_edge.url + path, headers=headers, timeout=5)
    assert response.status_code == 200
    assert recorded(upstream, path) == [0]
