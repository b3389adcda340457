"""Upstream failures, the keep-alive race, request smuggling and the edge's own endpoints.

Every failure the edge turns into a response of its own must use the project's envelope
(`{"error": {"code", "message", "request_id"}}`, `application/json`) and must say nothing
of the upstream's address, the libraries underneath or a stack trace. Requests whose
framing is ambiguous are refused with 400 and never reach the upstream. Everything runs on
real loopback sockets against the real edge; the misbehaving upstream is
`tests.servers.RawUpstream`, whose paths pick the misbehaviour (a unique suffix per test
lets `requests_seen` tell this test's requests from every other's).
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest

from tests.servers import RawUpstream, RunningEdge, UpstreamApp, closed_port, running_edge, wait_until
from tests.wire import WireResponse, raw_exchange

# What an edge-made response must never show: where the upstream is, what the edge is built
# on, or how it failed inside.
FORBIDDEN_WORDS = ("httptools", "uvicorn", "uvloop", "asyncio", "python", "starlette", "traceback", 'file "')

SETTLE = 0.3  # time for a request the edge should not have forwarded to reach the upstream anyway


# -- helpers ------------------------------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}/{uuid.uuid4().hex}"


def seen(raw_upstream: RawUpstream, path: str) -> int:
    """How many request heads for exactly `path` the raw upstream has read."""
    return raw_upstream.requests_seen.count(path.encode())


def get(url: str, *, method: str = "GET", content: bytes | None = None, timeout: float = 5.0) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=timeout) as client:
        return client.request(method, url, content=content)


def assert_envelope(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.content)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "request_id"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


def assert_reveals_nothing(status_line: bytes, headers: list[tuple[bytes, bytes]], body: bytes, port: int) -> None:
    """No address of the upstream, no library name, no stack trace - in the head or the body."""
    shown = b"\n".join([status_line, *(name + b": " + value for name, value in headers), body])
    text = shown.decode("latin-1").lower()
    assert str(port) not in text, text
    assert "127.0.0.1" not in text, text
    assert "localhost" not in text, text
    for word in FORBIDDEN_WORDS:
        assert word not in text, (word, text)


def assert_response_reveals_nothing(response: httpx.Response, port: int) -> None:
    status_line = f"HTTP/1.1 {response.status_code} {response.reason_phrase}".encode()
    assert_reveals_nothing(status_line, list(response.headers.raw), response.content, port)


def assert_raw_envelope(response: WireResponse, status: int, code: str) -> None:
    assert response.status == status, response.head
    assert response.values("content-type") == [b"application/json"], response.head
    length = response.values("content-length")
    assert length, response.head
    body = json.loads(response.body[: int(length[0])])
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "request_id"}, body
    assert body["error"]["code"] == code, body


@contextmanager
def unaccepting_listener() -> Iterator[int]:
    """A loopback port whose listen backlog is full: a new connection attempt hangs.

    Linux drops a SYN while the accept queue is full, so the connect neither succeeds nor
    fails until the connecting side gives up. Skips the test where that cannot be arranged.
    """
    with ExitStack() as stack:
        listener = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        for _ in range(16):
            filler = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        # Give the handshakes that fit in the queue time to complete.
        time.sleep(0.1)
        probe = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", port))
        except TimeoutError:
            yield port
            return
        except OSError as exc:
            pytest.skip(f"a full backlog does not hold a connect attempt here ({exc.__class__.__name__})")
        pytest.skip("a full backlog does not hold a connect attempt here (it connected)")


# -- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fast_raw_edge(raw_upstream: RawUpstream) -> Iterator[RunningEdge]:
    """An edge on the misbehaving upstream that gives up waiting after half a second."""
    with running_edge(raw_upstream.url, upstream_read_timeout=0.5, upstream_connect_timeout=1.0) as edge:
        yield edge


@pytest.fixture(scope="module")
def refused_edge() -> Iterator[RunningEdge]:
    """An edge whose upstream port has nothing listening."""
    with running_edge(f"http://127.0.0.1:{closed_port()}", upstream_connect_timeout=1.0) as edge:
        yield edge


def upstream_port(edge: RunningEdge) -> int:
    return edge.proxy.pool.origin.port


# -- 1. upstream failures become edge-made responses in the envelope -------------------------------------


def test_refused_upstream_is_502_upstream_unavailable(refused_edge: RunningEdge) -> None:
    started = time.monotonic()
    response = get(f"{refused_edge.url}/anything")
    assert time.monotonic() - started < 1.0
    assert_envelope(response, 502, "upstream_unavailable")
    assert response.headers["content-length"] == str(len(response.content))
    assert_response_reveals_nothing(response, upstream_port(refused_edge))


@pytest.mark.parametrize(
    "behaviour",
    [
        "/reset-before-response",
        "/close-before-response",
        "/malformed",
        "/both-framings",
    ],
)
def test_broken_upstream_is_502_upstream_unavailable(
    fast_raw_edge: RunningEdge, raw_upstream: RawUpstream, behaviour: str
) -> None:
    path = unique(behaviour)
    response = get(fast_raw_edge.url + path)
    assert_envelope(response, 502, "upstream_unavailable")
    assert_response_reveals_nothing(response, raw_upstream.port)
    # The request did reach the upstream (this is its failure, not a refusal of ours).
    assert seen(raw_upstream, path) >= 1


def test_broken_post_is_502_and_sent_once(fast_raw_edge: RunningEdge, raw_upstream: RawUpstream) -> None:
    path = unique("/reset-before-response")
    response = get(fast_raw_edge.url + path, method="POST", content=b"x" * 1000)
    assert_envelope(response, 502, "upstream_unavailable")
    assert_response_reveals_nothing(response, raw_upstream.port)
    assert seen(raw_upstream, path) == 1


def test_hanging_upstream_is_504_upstream_timeout(fast_raw_edge: RunningEdge, raw_upstream: RawUpstream) -> None:
    path = unique("/hang")
    started = time.monotonic()
    response = get(fast_raw_edge.url + path)
    elapsed = time.monotonic() - started
    assert_envelope(response, 504, "upstream_timeout")
    assert_response_reveals_nothing(response, raw_upstream.port)
    assert 0.4 <= elapsed < 1.5, elapsed  # upstream_read_timeout is 0.5 s
    assert seen(raw_upstream, path) == 1


def test_connect_timeout_is_504_upstream_timeout() -> None:
    with (
        unaccepting_listener() as port,
        running_edge(f"http://127.0.0.1:{port}", upstream_connect_timeout=0.3) as edge,
    ):
        started = time.monotonic()
        response = get(f"{edge.url}/anything")
        elapsed = time.monotonic() - started
        assert_envelope(response, 504, "upstream_timeout")
        assert_response_reveals_nothing(response, port)
        assert 0.25 <= elapsed < 1.5, elapsed


# -- 2. a full pool ------------------------------------------------------------------------------------


def test_full_pool_is_503_upstream_busy_with_retry_after(raw_upstream: RawUpstream) -> None:
    with running_edge(
        raw_upstream.url, upstream_pool_size=1, upstream_connect_timeout=0.3, upstream_read_timeout=10.0
    ) as edge:
        parked_path = unique("/hang")
        with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as parked:
            parked.sendall(f"GET {parked_path} HTTP/1.1\r\nHost: edge\r\n\r\n".encode())
            assert wait_until(lambda: seen(raw_upstream, parked_path) == 1, 3.0)
            assert edge.proxy.pool.in_use == 1

            path = unique("/ok")
            started = time.monotonic()
            response = get(edge.url + path)
            elapsed = time.monotonic() - started
            assert_envelope(response, 503, "upstream_busy")
            retry_after = response.headers.get("retry-after")
            assert retry_after is not None
            assert retry_after.isdigit()
            assert int(retry_after) >= 1
            assert_response_reveals_nothing(response, raw_upstream.port)
            assert 0.25 <= elapsed < 2.0, elapsed  # waited the connect timeout for a slot
            assert seen(raw_upstream, path) == 0

        # The parked client has gone: its slot comes back and the pool serves again.
        assert wait_until(lambda: edge.proxy.pool.in_use == 0, 2.0)
        response = get(edge.url + unique("/ok"))
        assert response.status_code == 200
        assert response.content == b"ok"


# -- 3. an upstream that dies mid-body -----------------------------------------------------------------


def test_upstream_dying_mid_body_cuts_the_client_short_at_once(
    raw_edge: RunningEdge, raw_upstream: RawUpstream
) -> None:
    path = unique("/die-mid-body")
    exchange = raw_exchange(raw_edge.port, f"GET {path} HTTP/1.1\r\nHost: edge\r\n\r\n".encode(), timeout=5.0)
    assert exchange.closed, "the edge left the client waiting"
    assert exchange.elapsed < 1.0, exchange.elapsed
    response = exchange.response
    assert response.status == 200
    assert response.values("content-length") == [b"1000000"]
    assert len(response.body) < 1_000_000
    assert response.body == b"x" * len(response.body)


def test_upstream_dying_mid_chunked_body_leaves_it_unterminated(
    raw_edge: RunningEdge, raw_upstream: RawUpstream
) -> None:
    path = unique("/die-mid-chunked")
    exchange = raw_exchange(raw_edge.port, f"GET {path} HTTP/1.1\r\nHost: edge\r\n\r\n".encode(), timeout=5.0)
    assert exchange.closed, "the edge left the client waiting"
    assert exchange.elapsed < 1.0, exchange.elapsed
    response = exchange.response
    assert response.status == 200
    assert response.values("transfer-encoding") == [b"chunked"]
    assert b"hello" in response.body
    # The last chunk never came: nothing may look like the end of the body.
    assert not response.body.endswith(b"0\r\n\r\n"), response.body


@pytest.mark.parametrize("behaviour", ["/die-mid-body", "/die-mid-chunked"])
def test_http_client_sees_the_cut_body_as_broken(raw_edge: RunningEdge, behaviour: str) -> None:
    started = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError):
        get(raw_edge.url + unique(behaviour), timeout=5.0)
    assert time.monotonic() - started < 1.0


# -- 4. the keep-alive race -----------------------------------------------------------------------------


def test_stale_keep_alive_connection_is_retried_for_gets(raw_upstream: RawUpstream) -> None:
    path = unique("/one-per-connection")
    with running_edge(raw_upstream.url) as edge, httpx.Client(trust_env=False, timeout=5.0) as client:
        responses = [client.get(edge.url + path) for _ in range(20)]
    assert [r.status_code for r in responses] == [200] * 20
    assert [r.content for r in responses] == [b"ok"] * 20
    count = seen(raw_upstream, path)
    # Each GET after the first met the connection the upstream had dropped (it saw the
    # request, then reset) and was sent once more on a fresh one: 1 + 19 * 2.
    assert count > 20, count
    assert count <= 2 * 20 - 1, count


def test_post_on_a_stale_connection_is_not_retried(raw_upstream: RawUpstream) -> None:
    first = unique("/one-per-connection")
    path = unique("/one-per-connection")
    with running_edge(raw_upstream.url) as edge, httpx.Client(trust_env=False, timeout=5.0) as client:
        warm = client.get(edge.url + first)
        assert warm.status_code == 200
        # The connection the upstream will drop on its next request, back in the pool (the
        # edge returns it just after the client has the response).
        assert wait_until(lambda: edge.proxy.pool.idle == 1, 1.0)
        response = client.post(edge.url + path, content=b"a body that cannot be replayed")
        assert_envelope(response, 502, "upstream_unavailable")
        assert_response_reveals_nothing(response, raw_upstream.port)
    assert seen(raw_upstream, first) == 1
    assert seen(raw_upstream, path) == 1


# -- 5. request smuggling --------------------------------------------------------------------------------


SMUGGLING = {
    "content-length-and-chunked": (
        b"POST {path} HTTP/1.1\r\nHost: edge\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET {path}/smuggled HTTP/1.1\r\nHost: edge\r\n\r\n"
    ),
    "chunked-and-content-length": (
        b"POST {path} HTTP/1.1\r\nHost: edge\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\nGET {path}/smuggled HTTP/1.1\r\nHost: edge\r\n\r\n"
    ),
    "non-hex-chunk-size": (
        b"POST {path} HTTP/1.1\r\nHost: edge\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
    ),
    "chunk-without-crlf": (
        b"POST {path} HTTP/1.1\r\nHost: edge\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n"
    ),
    "gzip-transfer-coding": (b"POST {path} HTTP/1.1\r\nHost: edge\r\nTransfer-Encoding: gzip\r\n\r\nnot really gzip"),
    "chunked-then-gzip": (
        b"POST {path} HTTP/1.1\r\nHost: edge\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
    "differing-content-lengths": (
        b"POST {path} HTTP/1.1\r\nHost: edge\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
    ),
}


@pytest.mark.parametrize("case", sorted(SMUGGLING))
def test_ambiguous_framing_is_400_and_never_forwarded(
    fast_raw_edge: RunningEdge, raw_upstream: RawUpstream, case: str
) -> None:
    path = unique(f"/smuggle-{case}")
    request = SMUGGLING[case].replace(b"{path}", path.encode())
    exchange = raw_exchange(fast_raw_edge.port, request, timeout=3.0)
    response = exchange.response
    assert_raw_envelope(response, 400, "bad_request")
    assert_reveals_nothing(response.status_line, response.headers, response.body, raw_upstream.port)
    assert exchange.closed, "the connection must not be reused after a framing error"
    time.sleep(SETTLE)
    forwarded = [p for p in raw_upstream.requests_seen if p.startswith(path.encode())]
    assert forwarded == [], f"reached the upstream: {forwarded}"


def test_well_formed_chunked_request_is_forwarded_with_its_body(edge: RunningEdge, upstream: UpstreamApp) -> None:
    """The control for the refusals above: correct chunking does reach the upstream, body and
    all; a body this small is read whole first and forwarded with its length."""
    path = unique("/chunked-control")
    request = (
        f"POST {path} HTTP/1.1\r\nHost: edge\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
        + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    response = raw_exchange(edge.port, request, timeout=3.0).response
    assert response.status == 200, response.head
    recorded = [r for r in upstream.record.requests if r.raw_path == path.encode()]
    assert len(recorded) == 1
    assert recorded[0].method == "POST"
    assert recorded[0].header(b"transfer-encoding") == []
    assert recorded[0].header(b"content-length") == [b"11"]
    assert recorded[0].body_length == len(b"hello world")


def test_ambiguous_framing_never_reaches_a_real_upstream(edge: RunningEdge, upstream: UpstreamApp) -> None:
    """The same refusals in front of the well-behaved upstream, which records any request it sees."""
    paths = []
    for case in sorted(SMUGGLING):
        path = unique(f"/smuggle-{case}")
        paths.append(path.encode())
        response = raw_exchange(edge.port, SMUGGLING[case].replace(b"{path}", path.encode()), timeout=3.0).response
        assert_raw_envelope(response, 400, "bad_request")
    time.sleep(SETTLE)
    reached = [p for p in upstream.record.paths() if any(p.startswith(path) for path in paths)]
    assert reached == [], f"reached the upstream: {reached}"


# -- 6. the edge's own endpoints ------------------------------------------------------------------------


def recorded_with(upstream: UpstreamApp, marker: str) -> list[bytes]:
    return [r.raw_path for r in upstream.record.requests if marker.encode() in r.query_string]


def test_live_is_answered_by_the_edge(edge: RunningEdge, upstream: UpstreamApp) -> None:
    marker = uuid.uuid4().hex
    response = get(f"{edge.url}/_edge/live?probe={marker}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"status": "alive"}
    time.sleep(SETTLE)
    assert recorded_with(upstream, marker) == []


def test_ready_is_200_when_the_upstream_is_up(edge: RunningEdge, upstream: UpstreamApp) -> None:
    marker = uuid.uuid4().hex
    response = get(f"{edge.url}/_edge/ready?probe={marker}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"status": "ready", "checks": {"upstream": "up", "rate_limit_store": "up"}}
    time.sleep(SETTLE)
    assert recorded_with(upstream, marker) == []


def test_ready_is_503_when_the_upstream_is_down(refused_edge: RunningEdge) -> None:
    response = get(f"{refused_edge.url}/_edge/ready")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert "error" not in body
    assert body["status"] != "ready"
    assert body["checks"] == {"upstream": "down", "rate_limit_store": "up"}
    assert_response_reveals_nothing(response, upstream_port(refused_edge))


def test_live_does_not_depend_on_the_upstream(refused_edge: RunningEdge) -> None:
    response = get(f"{refused_edge.url}/_edge/live")
    assert response.status_code == 200
    assert response.json() == {"status": "alive"}


def test_unknown_edge_path_is_404_in_the_envelope(edge: RunningEdge, upstream: UpstreamApp) -> None:
    marker = uuid.uuid4().hex
    response = get(f"{edge.url}/_edge/unknown?probe={marker}")
    assert_envelope(response, 404, "not_found")
    assert_response_reveals_nothing(response, upstream_port(edge))
    time.sleep(SETTLE)
    assert recorded_with(upstream, marker) == []


def test_wrong_method_on_edge_path_is_405_in_the_envelope_with_allow(edge: RunningEdge, upstream: UpstreamApp) -> None:
    marker = uuid.uuid4().hex
    response = get(f"{edge.url}/_edge/live?probe={marker}", method="POST", content=b"{}")
    assert_envelope(response, 405, "method_not_allowed")
    allow = response.headers.get("allow")
    assert allow is not None
    assert "GET" in [method.strip() for method in allow.split(",")]
    assert "POST" not in allow
    assert_response_reveals_nothing(response, upstream_port(edge))
    time.sleep(SETTLE)
    assert recorded_with(upstream, marker) == []


@pytest.mark.parametrize("raw_path", ["/%5Fedge/live", "/%5fedge/live", "/_edge%2Flive", "/%5F%65dge/live"])
def test_encoded_edge_path_is_answered_by_the_edge(edge: RunningEdge, upstream: UpstreamApp, raw_path: str) -> None:
    marker = uuid.uuid4().hex
    request = f"GET {raw_path}?probe={marker} HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n".encode()
    response = raw_exchange(edge.port, request, timeout=3.0).response
    assert response.status == 200, response.head
    assert json.loads(response.body) == {"status": "alive"}
    time.sleep(SETTLE)
    assert recorded_with(upstream, marker) == []
