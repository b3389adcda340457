"""No request can be smuggled into the upstream through a desynchronised pooled connection.

Every test runs the real edge, with one pooled upstream connection (`upstream_pool_size=1`),
in front of `tests.smuggling_support.RecordingUpstream`, which keeps every byte it receives
per connection and reads it with h11, a strict parser independent of the edge's llhttp.
With a pool of one, a connection the edge wrongly kept would carry the very next request,
so each attack is followed by a victim: a plain GET from a second client, which must get
its own answer (its own path in the body, no foreign status, cookie or redirect), promptly,
and - where the attack must have cost the connection - on a connection that carried
nothing before it. The upstream's record is then checked exactly: every request it parsed,
on every connection, in order, with its body and whether it was complete; no request the
client did not frame, none twice, no byte h11 could not read.

The rules come from docs/proxy.md ("Framing the edge can prove", "Upstream connections are
reused only when the exchange is proven complete", "Early responses", "Client
disconnects", "Slow clients"). Each docstring says how the edge would fail the test if
it did what the docs rule out: forward an Upgrade request as sent (the old behaviour), put
a connection back in the pool after an early response, a client hang-up, a size-limit
stop or an unreadable response, or merge trailers into the head.

The edges and upstreams are shared per module, one pair per configuration; before each
test the pool is emptied and the upstream's connections closed, so a test sees only the
upstream connections it caused (`Stage.first`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import pytest

from tests.servers import RunningEdge, running_edge, wait_until
from tests.smuggling_support import (
    POISON,
    Framed,
    ParsedRequest,
    RecordedConnection,
    RecordingUpstream,
    strict_reading,
)
from tests.wire import WireClient, WireResponse

HOST = b"edge.test"
VICTIM_TIMEOUT = 3.0  # far below the 90 s upstream read timeout a desynchronised victim would wait
SETTLE = 0.2  # time for a request the edge should not have forwarded to reach the upstream anyway
LIMIT = 1024  # max_body_bytes of the "limited" edges

# Every edge has one upstream connection, so a connection wrongly kept carries the next request.
EDGES: dict[str, dict[str, Any]] = {
    "buffered": {},  # bodies up to 64 KiB read before the exchange (the default)
    "streaming": {"request_buffer_bytes": 0},  # every body streams from its first byte
    "limited": {"max_body_bytes": LIMIT, "request_buffer_bytes": 0},
    "limited-buffered": {"max_body_bytes": LIMIT},
    "slow-body": {"request_buffer_bytes": 0, "client_body_timeout": 0.5},
}

# A request, complete and valid, as an attacker would hide it in a body.
EMBEDDED = (
    b"POST /api/v1/sessions HTTP/1.1\r\nHost: edge.test\r\nContent-Type: application/json\r\n"
    b"Content-Length: 2\r\n\r\n{}"
)

# What an answer from anyone but the upstream's own handler for the request would show.
POISON_MARKERS = (b"evil.example", b"attacker", b"XSTRAY", b"302 Found")


# -- stages: an edge and its recording upstream --------------------------------------------------------------


@dataclass
class Stage:
    edge: RunningEdge
    upstream: RecordingUpstream
    first: int = 0  # the first upstream connection this test caused

    @property
    def port(self) -> int:
        return self.edge.port

    def connections(self) -> list[RecordedConnection]:
        return self.upstream.snapshot()[self.first :]

    def requests(self) -> list[ParsedRequest]:
        return [request for connection in self.connections() for request in connection.requests]

    def connection(self, index: int) -> RecordedConnection:
        return self.upstream.snapshot()[index]

    def request_for(self, target: bytes, timeout: float = 2.0) -> ParsedRequest:
        """The one request for `target` the upstream has parsed (waiting for it to arrive)."""
        wait_until(lambda: any(r.target == target for r in self.requests()), timeout)
        found = [request for request in self.requests() if request.target == target]
        assert len(found) == 1, f"{target!r} reached the upstream {len(found)} times"
        return found[0]

    def wait_closed(self, index: int, timeout: float = 2.0) -> bool:
        return wait_until(lambda: self.connection(index).closed, timeout)

    def drain(self) -> None:
        """Empties the pool and waits for the upstream to see every connection closed."""
        assert wait_until(lambda: self.edge.proxy.pool.in_use == 0, 3.0), "an earlier exchange still holds the pool"
        loop = self.edge.server.loop
        assert loop is not None
        loop.call_soon_threadsafe(self.edge.proxy.pool.close)
        assert wait_until(lambda: all(c.closed for c in self.upstream.snapshot()), 3.0)
        self.first = len(self.upstream.snapshot())


class Stages:
    def __init__(self) -> None:
        self._stages: dict[str, Stage] = {}
        self._stack = ExitStack()

    def fresh(self, name: str) -> Stage:
        stage = self._stages.get(name)
        if stage is None:
            upstream = RecordingUpstream().start()
            self._stack.callback(upstream.stop)
            edge = self._stack.enter_context(running_edge(upstream.url, upstream_pool_size=1, **EDGES[name]))
            stage = self._stages[name] = Stage(edge, upstream)
        stage.drain()
        return stage

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(scope="module")
def stages() -> Iterator[Stages]:
    every = Stages()
    yield every
    every.close()


# -- helpers -------------------------------------------------------------------------------------------------


def unique(prefix: str) -> bytes:
    return f"{prefix}/{uuid.uuid4().hex[:16]}".encode()


def get(target: bytes, *extra: bytes) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (target, HOST, b"".join(extra))


def with_length(method: bytes, target: bytes, body: bytes, *extra: bytes) -> bytes:
    return b"%s %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n%s" % (
        method,
        target,
        HOST,
        b"".join(extra),
        len(body),
        body,
    )


def chunked(method: bytes, target: bytes, body: bytes, *extra: bytes, trailers: bytes = b"") -> bytes:
    return b"%s %s HTTP/1.1\r\nHost: %s\r\n%sTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n%s\r\n" % (
        method,
        target,
        HOST,
        b"".join(extra),
        len(body),
        body,
        trailers,
    )


def assert_own_answer(response: WireResponse, method: bytes, target: bytes, body_length: int) -> dict[str, Any]:
    """The upstream's answer to exactly this request, and nothing of anybody else's."""
    assert response.status == 200, (response.status, response.head, response.body)
    for marker in POISON_MARKERS:
        assert marker not in response.head + response.body, (marker, response.head, response.body)
    assert response.values("location") == [], response.head
    assert response.values("set-cookie") == [], response.head
    answer: dict[str, Any] = response.json()
    assert answer["method"] == method.decode(), answer
    assert answer["target"] == target.decode(), answer
    assert answer["body_length"] == body_length, answer
    return answer


def assert_envelope(response: WireResponse, status: int, code: str) -> None:
    assert response.status == status, (response.status, response.head, response.body)
    assert response.values("content-type") == [b"application/json"], response.head
    body = json.loads(response.body)
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "request_id"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    for marker in POISON_MARKERS:
        assert marker not in response.head + response.body, (marker, response.head)
    assert response.values("location") == [], response.head
    assert response.values("set-cookie") == [], response.head


def victim(stage: Stage) -> ParsedRequest:
    """A plain GET from a second client, right after the attack: its own answer, promptly,
    with no byte of anybody else's; returns the request as the upstream parsed it."""
    target = unique("/ok/victim")
    started = time.monotonic()
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        client.send(get(target))
        response = client.read_response()
        elapsed = time.monotonic() - started
        assert_own_answer(response, b"GET", target, 0)
        assert client.unexpected_bytes(0.1) == b""
    assert elapsed < VICTIM_TIMEOUT, elapsed
    recorded = stage.request_for(target)
    assert recorded.complete
    assert recorded.body == b""
    return recorded


def assert_on_a_new_connection(stage: Stage, request: ParsedRequest, attack_connection: int) -> None:
    """`request` opened an upstream connection of its own: the attack's was not reused."""
    assert request.connection != attack_connection, "the victim rode the attack's upstream connection"
    connection = stage.connection(request.connection)
    assert bytes(connection.received).startswith(b"GET " + request.target + b" HTTP/1.1\r\n"), connection.received


Expected = tuple[bytes, bytes, bytes, bool]  # method, target, body, complete


def seen(request: ParsedRequest) -> Expected:
    return (request.method, request.target, request.body, request.complete)


def assert_upstream_saw(stage: Stage, expected: list[Expected]) -> None:
    """Exactly these requests reached the upstream, in this order, each once, every byte of
    every connection read by h11 as HTTP/1.1."""

    def received() -> list[Expected]:
        return [seen(request) for request in stage.requests()]

    wait_until(lambda: received() == expected, 2.0)
    time.sleep(SETTLE)
    assert received() == expected
    for connection in stage.connections():
        assert connection.error is None, (connection.error, bytes(connection.received[:500]))
        assert connection.unparsed == b"", connection.unparsed


def framed(framed_requests: list[Framed]) -> list[Expected]:
    return [(request.method, request.target, request.body, True) for request in framed_requests]


def read_own_answers(client: WireClient, requests: list[Framed]) -> None:
    for request in requests:
        response = client.read_response(head_request=request.method == b"HEAD")
        if request.method == b"HEAD":
            assert response.status == 200, response.head
            assert response.body == b""
        else:
            assert_own_answer(response, request.method, request.target, len(request.body))
    assert client.unexpected_bytes(0.1) == b""


# -- 1. upgrades the edge does not proxy are ordinary requests, body and all ---------------------------------

UPGRADES = {
    "foo": b"Upgrade: foo\r\nConnection: upgrade\r\n",
    "h2c": b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
    "websocket": (
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
    ),
}


@pytest.mark.parametrize(
    ("edge_name", "upgrade", "method", "framing", "split"),
    [
        ("buffered", "foo", b"POST", "length", False),
        ("buffered", "foo", b"POST", "length", True),
        ("buffered", "foo", b"POST", "chunked", False),
        ("buffered", "foo", b"POST", "chunked", True),
        ("buffered", "h2c", b"POST", "length", False),
        ("buffered", "h2c", b"POST", "chunked", True),
        ("buffered", "h2c", b"GET", "length", False),
        ("buffered", "websocket", b"GET", "length", False),
        ("buffered", "websocket", b"GET", "chunked", True),
        ("buffered", "websocket", b"POST", "length", False),
        ("streaming", "foo", b"POST", "length", False),
        ("streaming", "foo", b"POST", "length", True),
        ("streaming", "h2c", b"POST", "chunked", False),
        ("streaming", "websocket", b"GET", "length", True),
    ],
)
def test_upgrade_with_a_body_is_forwarded_as_an_ordinary_request(
    stages: Stages, edge_name: str, upgrade: str, method: bytes, framing: str, split: bool
) -> None:
    """The body of an unproxied upgrade, which looks like a request, reaches the upstream as
    that request's body and never as a request. Before: the request was forwarded as sent
    while llhttp skipped its body, so the body stayed on the upstream connection and was
    parsed as `POST /api/v1/sessions` - a request the client never framed."""
    stage = stages.fresh(edge_name)
    target = unique("/ok/upgrade")
    build = with_length if framing == "length" else chunked
    request = build(method, target, EMBEDDED, UPGRADES[upgrade])
    head, _, body = request.partition(b"\r\n\r\n")
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        if split:
            client.send(head + b"\r\n\r\n")
            time.sleep(0.05)
            client.send(body)
        else:
            client.send(request)
        assert_own_answer(client.read_response(), method, target, len(EMBEDDED))
        assert client.unexpected_bytes(0.1) == b""
    forwarded = stage.request_for(target)
    for name in (b"upgrade", b"connection", b"http2-settings"):
        assert forwarded.header(name) == [], (name, forwarded.headers)
    after = victim(stage)
    assert_upstream_saw(stage, [(method, target, EMBEDDED, True), seen(after)])


@pytest.mark.parametrize("upgrade", sorted(UPGRADES))
def test_bodiless_upgrade_is_ordinary_and_what_follows_is_the_next_request(stages: Stages, upgrade: str) -> None:
    """A POST asking for an upgrade (websocket-style, h2c, made up) with no body is answered
    as a plain request, and the bytes behind it as the next one - what h11 reads - rather
    than being handed to a tunnel or left for the upstream to switch protocols on."""
    stage = stages.fresh("buffered")
    first, second = unique("/ok/upgrade-post"), unique("/ok/after-upgrade")
    data = b"POST %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (first, HOST, UPGRADES[upgrade]) + get(second)
    reading = strict_reading(data)
    assert reading.error is None
    assert reading.requests == [Framed(b"POST", first), Framed(b"GET", second)]
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        client.send(data)
        read_own_answers(client, reading.requests)
    assert stage.request_for(first).header(b"upgrade") == []
    after = victim(stage)
    assert_upstream_saw(stage, [*framed(reading.requests), seen(after)])


def test_upgrade_pipelined_behind_a_request_never_leaves_its_body_as_a_request(stages: Stages) -> None:
    """An upgrade with a body, pipelined behind a plain request: the first is answered; the
    upgrade is then refused (400, the connection closed) or forwarded as an ordinary request
    with its body - never its body forwarded as a request of its own."""
    stage = stages.fresh("buffered")
    first, upgrade = unique("/ok/before-upgrade"), unique("/ok/pipelined-upgrade")
    data = get(first) + with_length(b"POST", upgrade, EMBEDDED, UPGRADES["foo"])
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        client.send(data)
        assert_own_answer(client.read_response(), b"GET", first, 0)
        second = client.read_response()
        if second.status == 200:
            assert_own_answer(second, b"POST", upgrade, len(EMBEDDED))
            expected = [(b"GET", first, b"", True), (b"POST", upgrade, EMBEDDED, True)]
        else:
            assert_envelope(second, 400, "bad_request")
            assert client.closed_by_peer()
            expected = [(b"GET", first, b"", True)]
    after = victim(stage)
    assert_upstream_saw(stage, [*expected, seen(after)])


@contextmanager
def own_stage(**overrides: Any) -> Iterator[tuple[Stage, list[BaseException]]]:
    """An edge and upstream of this test's own (one that a test may leave broken), and the
    exceptions that end any thread meanwhile - the edge's server thread stopping included."""
    failures: list[BaseException] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None:
            failures.append(args.exc_value)

    threading.excepthook = hook
    upstream = RecordingUpstream().start()
    try:
        with running_edge(upstream.url, upstream_pool_size=1, **overrides) as edge:
            yield Stage(edge, upstream), failures
    finally:
        upstream.stop()
        threading.excepthook = previous


def handshake_with_a_request_behind(target: bytes, hidden: bytes) -> bytes:
    return get(target, UPGRADES["websocket"]) + get(hidden)


def test_request_pipelined_behind_a_websocket_handshake_never_reaches_the_upstream() -> None:
    """A WebSocket handshake with a request written right behind it, in the same packet (a
    client may send nothing before the handshake is answered): whatever the client is told,
    the bytes behind the handshake never reach the upstream as a request."""
    with own_stage() as (stage, _):
        target, hidden = unique("/ok/ws"), unique("/ok/behind-handshake")
        with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
            client.send(handshake_with_a_request_behind(target, hidden))
            rest = b""
            with suppress(EOFError, ConnectionError):
                client.read_response()
                rest = client.unexpected_bytes(0.3)
            assert hidden not in rest + client.buffer
        after = victim(stage)
        assert all(request.target != hidden for request in stage.requests())
        upstream_saw = [seen(request) for request in stage.requests() if request.target == target]
        assert_upstream_saw(stage, [*upstream_saw, seen(after)])


def test_websocket_handshake_with_bytes_behind_it_is_answered_and_shutdown_stays_clean() -> None:
    """The same handshake: a client must wait for the handshake's answer before it sends
    anything (RFC 6455 section 4.1), so the bytes behind it are nobody's frames: 400 in the
    envelope, not a bare close, and the edge still shuts down cleanly afterwards."""
    with own_stage() as (stage, failures), WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        client.send(handshake_with_a_request_behind(unique("/ok/ws"), unique("/ok/behind-handshake")))
        assert_envelope(client.read_response(), 400, "bad_request")
    assert failures == []


# -- 2. CONNECT is never proxied -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda port: with_length(b"CONNECT", b"/", EMBEDDED), id="origin-form-with-length"),
        pytest.param(lambda port: chunked(b"CONNECT", b"/", EMBEDDED), id="origin-form-chunked"),
        pytest.param(
            lambda port: b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n%s" % (port, port, EMBEDDED),
            id="authority-form-to-the-upstream",
        ),
        pytest.param(
            lambda port: b"CONNECT edge.test:443 HTTP/1.1\r\nHost: edge.test:443\r\n\r\n" + EMBEDDED,
            id="authority-form",
        ),
    ],
)
def test_connect_is_refused_501_and_nothing_is_forwarded(stages: Stages, build: Callable[[int], bytes]) -> None:
    """CONNECT, with a body or a tunnel's worth of bytes behind it, is answered 501 by the edge
    and the connection closed: not one byte reaches the upstream, so nothing in the body (a
    whole `POST /api/v1/sessions`) can be taken for a request there."""
    stage = stages.fresh("buffered")
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        client.send(build(stage.upstream.port))
        assert_envelope(client.read_response(), 501, "not_implemented")
        assert client.closed_by_peer()
    after = victim(stage)
    assert len(stage.connections()) == 1  # the victim's own
    assert_on_a_new_connection(stage, after, -1)
    assert_upstream_saw(stage, [seen(after)])


# -- 3. an early response closes the upstream connection -----------------------------------------------------


@pytest.mark.parametrize(
    ("edge_name", "declared"),
    [("streaming", 200_000), ("buffered", 1_000_000)],  # buffered: over 64 KiB, so it streams
)
def test_early_response_closes_the_upstream_connection(stages: Stages, edge_name: str, declared: int) -> None:
    """The upstream answers 413 after the head, before the body (which the client is still
    sending). The client gets the 413 and `Connection: close`; the upstream connection, in the
    middle of a body, is closed, and the victim - sent while the attacker is still connected -
    goes to a new connection and is answered at once. Before: the connection went back to the
    pool; the victim's request was read by the upstream as the rest of the 413'd body and the
    victim waited for the 90 s read timeout."""
    stage = stages.fresh(edge_name)
    target = unique("/early")
    sent = b"a" * 16384
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        client.send(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (target, HOST, declared) + sent)
        response = client.read_response()
        assert response.status == 413, response.head
        assert response.json() == {"early": True, "target": target.decode()}
        assert response.values("connection") == [b"close"]
        attack = stage.request_for(target)
        assert stage.wait_closed(attack.connection), "the edge kept the upstream connection of an early response"
        after = victim(stage)
    assert_on_a_new_connection(stage, after, attack.connection)
    early = stage.request_for(target)
    assert not early.complete
    assert sent.startswith(early.body)
    assert_upstream_saw(stage, [(b"POST", target, early.body, False), seen(after)])
    assert after.target not in stage.connection(attack.connection).received


def test_early_response_to_a_whole_body_never_desynchronises(stages: Stages) -> None:
    """The same early 413, with the whole (streamed) body in the same write as the head. The
    edge may have sent all of it by the time the answer ends - then the exchange is complete
    and the connection may be kept - or not, and then it must be closed. Either way the
    victim is answered by its own request, and the upstream never reads a byte of it as body."""
    stage = stages.fresh("streaming")
    target = unique("/early")
    body = b"b" * 300_000
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        client.send(with_length(b"POST", target, body))
        response = client.read_response()
        assert response.status == 413, response.head
    after = victim(stage)
    early = stage.request_for(target)
    if after.connection == early.connection:
        assert early.complete
        assert early.body == body
    else:
        assert stage.wait_closed(early.connection)
    assert_upstream_saw(stage, [(b"POST", target, early.body, early.complete), seen(after)])


# -- 4. a client that leaves (or stalls) mid-body ------------------------------------------------------------


@pytest.mark.parametrize(
    ("edge_name", "declared", "sent"),
    [
        ("streaming", 1_000_000, 40_000),
        ("buffered", 1_000_000, 40_000),
        ("streaming", 100, 40),
    ],
)
def test_client_hanging_up_mid_body_closes_the_upstream_connection(
    stages: Stages, edge_name: str, declared: int, sent: int
) -> None:
    """A streamed body with a declared length, cut off by the client: the upstream connection,
    owed the rest of the body, is closed and never reused. Were it back in the pool, the
    victim's request on it would be read as the missing body bytes and never answered."""
    stage = stages.fresh(edge_name)
    target = unique("/ok/hang-up")
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        client.send(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (target, HOST, declared))
        client.send(b"c" * sent)
        assert wait_until(lambda: any(len(r.body) == sent for r in stage.requests()), 2.0)
    attack = stage.request_for(target)
    assert stage.wait_closed(attack.connection), "the edge kept an upstream connection owed part of a body"
    after = victim(stage)
    assert_on_a_new_connection(stage, after, attack.connection)
    assert_upstream_saw(stage, [(b"POST", target, b"c" * sent, False), seen(after)])


def test_client_hanging_up_before_a_buffered_body_is_read_forwards_nothing(stages: Stages) -> None:
    """`Content-Length: 100`, 40 bytes, then the client leaves: a body this small is read
    before an upstream connection is taken, so the upstream hears nothing at all."""
    stage = stages.fresh("buffered")
    target = unique("/ok/hang-up-small")
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        client.send(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: 100\r\n\r\n%s" % (target, HOST, b"d" * 40))
        time.sleep(SETTLE)
    after = victim(stage)
    assert len(stage.connections()) == 1
    assert_upstream_saw(stage, [seen(after)])


def test_stalled_body_is_408_and_closes_the_upstream_connection(stages: Stages) -> None:
    """A streamed body that stops: 408 after the body timeout (0.5 s here), the upstream
    connection, owed the rest, closed; the victim on a new one."""
    stage = stages.fresh("slow-body")
    target = unique("/ok/stalled")
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        client.send(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: 10000\r\n\r\n%s" % (target, HOST, b"e" * 100))
        assert_envelope(client.read_response(), 408, "request_timeout")
        assert client.closed_by_peer()
    attack = stage.request_for(target)
    assert stage.wait_closed(attack.connection)
    after = victim(stage)
    assert_on_a_new_connection(stage, after, attack.connection)
    assert_upstream_saw(stage, [(b"POST", target, b"e" * 100, False), seen(after)])


# -- 5. a chunked body over the size limit -------------------------------------------------------------------


def test_chunked_body_over_the_limit_is_413_and_closes_the_upstream_connection(stages: Stages) -> None:
    """A streamed chunked body passes `max_body_bytes` after its head and first chunk went
    upstream. The client gets 413 and a closed connection; the upstream connection, in the
    middle of a chunked body, is closed; the rest of the chunks and the request pipelined
    behind them reach nobody, and the victim starts a clean connection. Were the connection
    kept, the upstream would read the victim's request as more chunk data (h11 would fail it)."""
    stage = stages.fresh("limited")
    target, behind = unique("/ok/too-big"), unique("/ok/behind-too-big")
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        client.send(b"POST %s HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % (target, HOST))
        client.send(b"200\r\n" + b"f" * 512 + b"\r\n")
        assert wait_until(lambda: any(r.body == b"f" * 512 for r in stage.requests()), 2.0)
        client.send(b"400\r\n" + b"g" * 1024 + b"\r\n" + b"5\r\nhello\r\n0\r\n\r\n" + get(behind))
        response = client.read_response()
        assert_envelope(response, 413, "payload_too_large")
        assert response.values("connection") == [b"close"]
        assert client.closed_by_peer()
    attack = stage.request_for(target)
    assert stage.wait_closed(attack.connection), "the edge kept an upstream connection in the middle of a chunked body"
    after = victim(stage)
    assert_on_a_new_connection(stage, after, attack.connection)
    assert_upstream_saw(stage, [(b"POST", target, b"f" * 512, False), seen(after)])
    assert b"g" * 16 not in stage.connection(attack.connection).received


def test_buffered_chunked_body_over_the_limit_forwards_nothing(stages: Stages) -> None:
    """The same with request buffering: the body is counted before any upstream connection is
    taken, so 413 and nothing at all upstream, the pipelined request included."""
    stage = stages.fresh("limited-buffered")
    target, behind = unique("/ok/too-big"), unique("/ok/behind-too-big")
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        client.send(chunked(b"POST", target, b"h" * (2 * LIMIT)) + get(behind))
        assert_envelope(client.read_response(), 413, "payload_too_large")
        assert client.closed_by_peer()
    after = victim(stage)
    assert_upstream_saw(stage, [seen(after)])


def test_declared_length_over_the_limit_forwards_nothing_hidden_in_the_body(stages: Stages) -> None:
    """A declared length over the limit is 413 before the body is read, and the connection is
    closed rather than drained: the request inside the body and the one behind it are never
    read as requests (a CL.0 attempt against the edge's own early answer)."""
    stage = stages.fresh("limited-buffered")
    hidden, behind = unique("/ok/hidden"), unique("/ok/behind")
    body = get(hidden) + b"i" * (2 * LIMIT)
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        client.send(with_length(b"POST", unique("/ok/declared-too-big"), body) + get(behind))
        assert_envelope(client.read_response(), 413, "payload_too_large")
        assert client.closed_by_peer()
    after = victim(stage)
    assert_upstream_saw(stage, [seen(after)])


# -- 6-8. upstream responses that cannot be read one way -----------------------------------------------------


@pytest.mark.parametrize("kind", ["merged", "extra", "both-framings", "two-lengths", "te-gzip", "switching"])
def test_upstream_response_that_cannot_be_read_one_way_is_502_and_closes_it(stages: Stages, kind: str) -> None:
    """A second response in the same write (a 302 with `Location` and `Set-Cookie`), stray bytes
    after a complete response, both framings, two lengths, a transfer coding other than
    chunked, an unasked-for 101: the client gets the 502 envelope - never the 302, its
    location or its cookie - the upstream connection is closed, and the victim gets its own
    answer on a new one. Were the response relayed and the connection kept, the 302 would be
    the victim's answer (or, once the parser is reset, the connection a reused broken one)."""
    stage = stages.fresh("buffered")
    target = unique(f"/{kind}")
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        client.send(get(target))
        assert_envelope(client.read_response(), 502, "upstream_unavailable")
        assert client.unexpected_bytes(0.1) == b""
        # The client's own connection is still good: the next request gets its own answer.
        follow_up = unique("/ok/follow-up")
        client.send(get(follow_up))
        assert_own_answer(client.read_response(), b"GET", follow_up, 0)
        attack = stage.request_for(target)
        assert stage.wait_closed(attack.connection), "the edge kept a connection with an unreadable response"
    assert_on_a_new_connection(stage, stage.request_for(follow_up), attack.connection)
    after = victim(stage)
    assert after.connection != attack.connection
    assert_upstream_saw(stage, [(b"GET", target, b"", True), (b"GET", follow_up, b"", True), seen(after)])


class Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_unasked_for_101_is_refused_without_a_fatal_transport_error(stages: Stages) -> None:
    """An unasked-for 101 is a malformed response like the others: 502, and the upstream
    connection closed by the edge itself, not by the event loop after an exception escaped
    the protocol callback."""
    stage = stages.fresh("buffered")
    target = unique("/switching")
    collected = Collected()
    event_loop_log = logging.getLogger("asyncio")  # where an exception escaping a protocol is told
    event_loop_log.addHandler(collected)
    try:
        with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
            client.send(get(target))
            assert_envelope(client.read_response(), 502, "upstream_unavailable")
            assert stage.wait_closed(stage.request_for(target).connection)
    finally:
        event_loop_log.removeHandler(collected)
    assert collected.messages == []


def test_stray_bytes_after_a_delivered_response_close_the_idle_connection(stages: Stages) -> None:
    """A complete response, relayed, then - 0.1 s later, with the connection idle in the pool -
    an unsolicited 302. The response was whole and is delivered; the idle connection, which
    must stay silent, is closed when the bytes arrive, and the victim never sees them. Were
    the bytes left waiting in the pooled connection, they would be the victim's response
    (checked: a run with idle bytes kept for the next exchange fails here)."""
    stage = stages.fresh("buffered")
    target = unique("/extra-later")
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        client.send(get(target))
        assert_own_answer(client.read_response(), b"GET", target, 0)
        attack = stage.request_for(target)
        assert wait_until(lambda: POISON in stage.connection(attack.connection).sent, 2.0)
        assert stage.wait_closed(attack.connection), "the edge kept an idle connection that spoke out of turn"
        assert client.unexpected_bytes(0.1) == b""
    after = victim(stage)
    assert_on_a_new_connection(stage, after, attack.connection)
    assert_upstream_saw(stage, [(b"GET", target, b"", True), seen(after)])


def test_bytes_after_a_head_response_close_the_connection(stages: Stages) -> None:
    """A HEAD answered with a head and then, in the same write, the body its `Content-Length`
    names - here a whole 302. A HEAD response ends with its head, so these are bytes after a
    complete response: they are never relayed (502, or the response relayed) and the
    connection they came on is never used again."""
    stage = stages.fresh("buffered")
    target = unique("/head-body")
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        client.send(b"HEAD %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, HOST))
        response = client.read_response(head_request=True)
        assert response.status in (200, 502), response.head
        assert client.unexpected_bytes(0.1) == b""
    attack = stage.request_for(target)
    assert stage.wait_closed(attack.connection), "the edge kept a connection with bytes after a HEAD response"
    after = victim(stage)
    assert_on_a_new_connection(stage, after, attack.connection)
    assert_upstream_saw(stage, [(b"HEAD", target, b"", True), seen(after)])


def test_the_rest_of_a_head_response_body_never_answers_the_next_request(stages: Stages) -> None:
    """The consequence: an upstream that sends a body with a HEAD response (a download handler
    that ignores the method) and is still writing it when the next request comes. The first
    bytes came with the head; the edge took them for the body, relayed the HEAD response and
    pooled the connection; the victim's request went on it and the rest of the body - a 302
    with a cookie, for all the edge knows content a user uploaded - was read as the victim's
    response. A HEAD response that announces a body now never leaves its connection
    reusable, so the victim goes to a new one."""
    stage = stages.fresh("buffered")
    target = unique("/head-slow-body")
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        client.send(b"HEAD %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, HOST))
        response = client.read_response(head_request=True)
        assert response.status in (200, 502), response.head
    attack = stage.request_for(target)
    after = victim(stage)
    assert after.connection != attack.connection


# -- 9. chunked trailers never become headers ----------------------------------------------------------------


@pytest.mark.parametrize("edge_name", ["buffered", "streaming"])
def test_trailers_never_reach_the_upstream(stages: Stages, edge_name: str) -> None:
    """Trailer fields claiming another Host, credentials and a forwarding address are dropped:
    the upstream receives them neither as headers nor as trailers, and the request arrives
    with its own Host and the edge's own X-Forwarded-For. Before: llhttp's trailer fields
    were appended to the request's headers (a second Host, an Authorization)."""
    stage = stages.fresh(edge_name)
    target = unique("/ok/trailers")
    trailers = b"Host: evil.example\r\nAuthorization: Bearer stolen\r\nX-Forwarded-For: 6.6.6.6\r\n"
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        client.send(chunked(b"POST", target, b"hello world", b"Trailer: Host, Authorization\r\n", trailers=trailers))
        assert_own_answer(client.read_response(), b"POST", target, 11)
    forwarded = stage.request_for(target)
    assert forwarded.header(b"host") == [HOST]
    assert forwarded.header(b"authorization") == []
    assert forwarded.header(b"x-forwarded-for") == [b"127.0.0.1"]
    assert forwarded.header(b"trailer") == []
    assert forwarded.trailers == []
    received = bytes(stage.connection(forwarded.connection).received).lower()
    for word in (b"evil.example", b"authorization", b"stolen", b"6.6.6.6"):
        assert word not in received, word
    after = victim(stage)
    assert_upstream_saw(stage, [(b"POST", target, b"hello world", True), seen(after)])


# -- 10. pipelining ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("edge_name", ["buffered", "streaming"])
def test_pipelined_requests_are_answered_in_order_and_forwarded_once(stages: Stages, edge_name: str) -> None:
    stage = stages.fresh(edge_name)
    first, second, third = unique("/ok/one"), unique("/ok/two"), unique("/ok/three")
    data = get(first) + with_length(b"POST", second, b"body two") + chunked(b"PUT", third, b"body three")
    reading = strict_reading(data)
    assert reading.error is None
    assert len(reading.requests) == 3
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        client.send(data)
        read_own_answers(client, reading.requests)
    after = victim(stage)
    assert_upstream_saw(stage, [*framed(reading.requests), seen(after)])


def pipelined_cases() -> dict[str, Callable[[bytes, bytes, bytes], bytes]]:
    """Two framed requests, the first with a body holding a whole other request."""
    return {
        "length-body": lambda a, s, b: with_length(b"POST", a, get(s)) + get(b),
        "chunked-body": lambda a, s, b: chunked(b"POST", a, b"0\r\n\r\n" + get(s)) + get(b),
        "chunked-body-two-chunks": lambda a, s, b: (
            b"POST %s HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % (a, HOST)
            + b"5\r\n0\r\n\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(get(s)), get(s))
            + get(b)
        ),
        "upgrade-with-body": lambda a, s, b: with_length(b"POST", a, get(s), UPGRADES["h2c"]) + get(b),
        "get-with-length-body": lambda a, s, b: with_length(b"GET", a, get(s)) + get(b),
    }


@pytest.mark.parametrize("edge_name", ["buffered", "streaming"])
@pytest.mark.parametrize("case", sorted(pipelined_cases()))
@pytest.mark.parametrize("split", [False, True], ids=["one-write", "byte-by-byte-head"])
def test_pipelined_smuggling_payload_is_split_as_h11_reads_it(
    stages: Stages, edge_name: str, case: str, split: bool
) -> None:
    """A request whose body holds another request, and a real request behind it: exactly the
    two requests h11 reads reach the upstream, the body with the first; the hidden one never."""
    stage = stages.fresh(edge_name)
    first, hidden, second = unique("/ok/carrier"), unique("/ok/hidden"), unique("/ok/second")
    data = pipelined_cases()[case](first, hidden, second)
    reading = strict_reading(data)
    assert reading.error is None
    assert [r.target for r in reading.requests] == [first, second]
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        if split:
            head, separator, rest = data.partition(b"\r\n\r\n")
            for byte in head + separator:
                client.send(bytes([byte]))
            client.send(rest)
        else:
            client.send(data)
        read_own_answers(client, reading.requests)
    after = victim(stage)
    assert_upstream_saw(stage, [*framed(reading.requests), seen(after)])
    assert all(r.target != hidden for r in stage.requests())


# -- 11. the classics: CL.TE, TE.CL, TE.TE, CL.0, 0.CL -------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    build: Callable[[bytes, bytes], bytes]  # (the attack's target, a target hidden in it) -> bytes
    refused: tuple[int, str] | None  # what docs/proxy.md promises, or None: it is forwarded
    # When forwarded: what must reach the upstream, if not what h11 reads (`None`); only
    # where RFC 9112 itself reads the bytes so and h11 is stricter than the RFC.
    reading: Callable[[bytes, bytes], list[Framed]] | None = None


def post(target: bytes, head: bytes, body: bytes) -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: %s\r\n%s\r\n%s" % (target, HOST, head, body)


def smuggled(target: bytes) -> bytes:
    return get(target)


BAD_REQUEST = (400, "bad_request")
NOT_IMPLEMENTED = (501, "not_implemented")

ATTACKS: dict[str, Attack] = {
    # CL.TE: a front end using the length would forward the hidden request inside the body;
    # a back end using the chunking would read it as the next request.
    "cl-te": Attack(
        lambda a, s: (
            post(a, b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % (5 + len(get(s))), b"0\r\n\r\n")
            + smuggled(s)
        ),
        BAD_REQUEST,
    ),
    # TE.CL: the other way round.
    "te-cl": Attack(
        lambda a, s: post(
            a,
            b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled(s)), smuggled(s)),
        ),
        BAD_REQUEST,
    ),
    # TE.TE: one side is made not to see the chunking.
    "te-xchunked-with-cl": Attack(
        lambda a, s: post(a, b"Content-Length: 4\r\nTransfer-Encoding: xchunked\r\n", b"5c\r\n" + smuggled(s)),
        BAD_REQUEST,
    ),
    "te-xchunked": Attack(
        lambda a, s: post(a, b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n" + smuggled(s)), BAD_REQUEST
    ),
    "te-space-before-colon": Attack(
        lambda a, s: post(a, b"Content-Length: 4\r\nTransfer-Encoding : chunked\r\n", b"5c\r\n" + smuggled(s)),
        BAD_REQUEST,
    ),
    "te-space-before-colon-alone": Attack(
        lambda a, s: post(a, b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n" + smuggled(s)), BAD_REQUEST
    ),
    "te-tab-with-cl": Attack(
        lambda a, s: post(a, b"Content-Length: 4\r\nTransfer-Encoding:\tchunked\r\n", b"0\r\n\r\n" + smuggled(s)),
        BAD_REQUEST,
    ),
    # A tab is optional whitespace (RFC 9110 section 5.6.3): plain chunking, as h11 reads it.
    "te-tab": Attack(lambda a, s: post(a, b"Transfer-Encoding:\tchunked\r\n", b"0\r\n\r\n") + smuggled(s), None),
    "te-vertical-tab": Attack(
        lambda a, s: post(a, b"Transfer-Encoding: \x0bchunked\r\n", b"0\r\n\r\n" + smuggled(s)), BAD_REQUEST
    ),
    "te-chunked-then-other": Attack(
        lambda a, s: post(a, b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n", b"0\r\n\r\n" + smuggled(s)),
        BAD_REQUEST,
    ),
    "te-other-then-chunked": Attack(
        lambda a, s: post(a, b"Transfer-Encoding: x\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + smuggled(s)),
        NOT_IMPLEMENTED,
    ),
    "te-chunked-twice": Attack(
        lambda a, s: post(
            a, b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + smuggled(s)
        ),
        BAD_REQUEST,
    ),
    "te-identity-chunked": Attack(
        lambda a, s: post(a, b"Transfer-Encoding: identity, chunked\r\n", b"0\r\n\r\n" + smuggled(s)), NOT_IMPLEMENTED
    ),
    "te-quoted": Attack(
        lambda a, s: post(a, b'Transfer-Encoding: "chunked"\r\n', b"0\r\n\r\n" + smuggled(s)), BAD_REQUEST
    ),
    "te-upper-case": Attack(lambda a, s: post(a, b"Transfer-Encoding: CHUNKED\r\n", b"0\r\n\r\n") + smuggled(s), None),
    "te-trailing-space": Attack(
        lambda a, s: post(a, b"Transfer-Encoding: chunked \r\n", b"0\r\n\r\n") + smuggled(s), None
    ),
    # RFC 9110 section 5.6.1 would skip the empty element; docs/proxy.md refuses it, as h11,
    # nginx and Go do: it is how a coding is hidden from a component that reads it otherwise.
    "te-empty-element": Attack(
        lambda a, s: post(a, b"Transfer-Encoding: , chunked\r\n", b"0\r\n\r\n") + smuggled(s), BAD_REQUEST
    ),
    # Not a framing field at all: the length frames the body, and the field is never forwarded.
    "te-underscore-with-cl": Attack(
        lambda a, s: (
            post(a, b"Content-Length: %d\r\nTransfer_Encoding: chunked\r\n" % len(b"0\r\n\r\n"), b"0\r\n\r\n")
            + smuggled(s)
        ),
        None,
    ),
    "te-in-http-1.0": Attack(
        lambda a, s: (
            b"POST %s HTTP/1.0\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % (a, HOST) + smuggled(s)
        ),
        BAD_REQUEST,
    ),
    "te-obs-fold": Attack(
        lambda a, s: post(a, b"Content-Length: 4\r\nTransfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n" + smuggled(s)),
        BAD_REQUEST,
    ),
    # Lengths that one parser reads and another does not.
    "cl-twice-differing": Attack(
        lambda a, s: post(a, b"Content-Length: 0\r\nContent-Length: %d\r\n" % len(smuggled(s)), smuggled(s)),
        BAD_REQUEST,
    ),
    "cl-twice-equal": Attack(
        lambda a, s: post(a, b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello") + smuggled(s), BAD_REQUEST
    ),
    "cl-list": Attack(lambda a, s: post(a, b"Content-Length: 5, 5\r\n", b"hello") + smuggled(s), BAD_REQUEST),
    "cl-plus": Attack(lambda a, s: post(a, b"Content-Length: +5\r\n", b"hello") + smuggled(s), BAD_REQUEST),
    "cl-negative": Attack(lambda a, s: post(a, b"Content-Length: -1\r\n", b"") + smuggled(s), BAD_REQUEST),
    "cl-hex": Attack(lambda a, s: post(a, b"Content-Length: 0x5\r\n", b"hello") + smuggled(s), BAD_REQUEST),
    "cl-obs-fold": Attack(lambda a, s: post(a, b"Content-Length:\r\n 5\r\n", b"hello") + smuggled(s), BAD_REQUEST),
    "cl-leading-zeros": Attack(lambda a, s: post(a, b"Content-Length: 005\r\n", b"hello") + smuggled(s), None),
    "cl-huge": Attack(
        lambda a, s: post(a, b"Content-Length: 99999999999999999999999\r\n", b"") + smuggled(s), BAD_REQUEST
    ),
    # Chunk syntax that one parser reads and another does not.
    "chunk-size-space": Attack(
        lambda a, s: post(a, b"Transfer-Encoding: chunked\r\n", b"5 \r\nhello\r\n0\r\n\r\n") + smuggled(s),
        BAD_REQUEST,
    ),
    "chunk-size-hex-prefix": Attack(
        lambda a, s: post(a, b"Transfer-Encoding: chunked\r\n", b"0x5\r\nhello\r\n0\r\n\r\n") + smuggled(s),
        BAD_REQUEST,
    ),
    "chunk-size-overflow": Attack(
        lambda a, s: (
            post(a, b"Transfer-Encoding: chunked\r\n", b"10000000000000005\r\nhello\r\n0\r\n\r\n") + smuggled(s)
        ),
        BAD_REQUEST,
    ),
    "chunk-bare-lf": Attack(
        lambda a, s: post(a, b"Transfer-Encoding: chunked\r\n", b"5\nhello\n0\n\n") + smuggled(s), BAD_REQUEST
    ),
    "chunk-data-longer-than-size": Attack(
        lambda a, s: post(a, b"Transfer-Encoding: chunked\r\n", b"3\r\nhello\r\n0\r\n\r\n") + smuggled(s),
        BAD_REQUEST,
    ),
    "chunk-extension": Attack(
        lambda a, s: post(a, b"Transfer-Encoding: chunked\r\n", b"5;name=value\r\nhello\r\n0\r\n\r\n") + smuggled(s),
        None,
    ),
    "chunk-quoted-extension-with-crlf": Attack(
        lambda a, s: (
            post(a, b"Transfer-Encoding: chunked\r\n", b'5;a="x\r\n0\r\n\r\n"\r\nhello\r\n0\r\n\r\n') + smuggled(s)
        ),
        BAD_REQUEST,
    ),
    "chunk-leading-zeros": Attack(
        lambda a, s: post(a, b"Transfer-Encoding: chunked\r\n", b"0005\r\nhello\r\n0000\r\n\r\n") + smuggled(s), None
    ),
    "bad-trailer-line": Attack(
        lambda a, s: (
            post(a, b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\nNot a field\r\n\r\n") + smuggled(s)
        ),
        BAD_REQUEST,
    ),
    # Heads that one parser reads and another does not.
    "bare-lf-head": Attack(lambda a, s: b"GET %s HTTP/1.1\nHost: %s\n\n" % (a, HOST) + smuggled(s), BAD_REQUEST),
    "header-with-bare-cr": Attack(lambda a, s: get(a, b"X-A: a\rb\r\n") + smuggled(s), BAD_REQUEST),
    "header-with-nul": Attack(lambda a, s: get(a, b"X-A: a\x00b\r\n") + smuggled(s), BAD_REQUEST),
    "two-hosts": Attack(lambda a, s: get(a, b"Host: other.example\r\n") + smuggled(s), BAD_REQUEST),
    "absolute-form-other-host": Attack(
        lambda a, s: b"GET http://other.example%s HTTP/1.1\r\nHost: %s\r\n\r\n" % (a, HOST) + smuggled(s), BAD_REQUEST
    ),
    "http-0.9-style": Attack(lambda a, s: b"GET %s\r\n\r\n" % a + smuggled(s), (505, "http_version_not_supported")),
    # An empty line before a request line is ignored by a server (RFC 9112 section 2.2); h11
    # refuses it.
    "leading-empty-lines": Attack(
        lambda a, s: b"\r\n\r\n" + get(a) + smuggled(s),
        None,
        lambda a, s: [Framed(b"GET", a), Framed(b"GET", s)],
    ),
    # CL.0: a request whose body a front end might ignore, with a request inside the body.
    "cl0-get": Attack(lambda a, s: with_length(b"GET", a, smuggled(s)), None),
    "cl0-head": Attack(lambda a, s: with_length(b"HEAD", a, smuggled(s)), None),
    "cl0-options": Attack(lambda a, s: with_length(b"OPTIONS", a, smuggled(s)), None),
    "cl0-delete": Attack(lambda a, s: with_length(b"DELETE", a, smuggled(s)), None),
    # 0.CL: an explicit zero length, then a request that is the client's own next one.
    "0cl-explicit-zero": Attack(lambda a, s: post(a, b"Content-Length: 0\r\n", b"") + smuggled(s), None),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_classic_smuggling_is_refused_or_read_as_h11_reads_it(stages: Stages, name: str) -> None:
    """Each attack is sent in one write, a request hidden in or behind it. Either the edge
    refuses it as docs/proxy.md says (its envelope, the connection closed, not one byte
    upstream), or exactly the requests h11 reads reach the upstream, each once, each client
    answer naming its own request. Then the victim."""
    attack = ATTACKS[name]
    stage = stages.fresh("buffered")
    target, hidden = unique("/ok/attack"), unique("/ok/hidden")
    data = attack.build(target, hidden)
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        client.send(data)
        if attack.refused is not None:
            assert_envelope(client.read_response(), *attack.refused)
            assert client.closed_by_peer()
            expected: list[Framed] = []
        else:
            if attack.reading is None:
                reading = strict_reading(data)
                assert reading.error is None, reading
                expected = reading.requests
            else:
                expected = attack.reading(target, hidden)
            read_own_answers(client, expected)
    after = victim(stage)
    assert_upstream_saw(stage, [*framed(expected), seen(after)])
    if attack.refused is not None:
        assert len(stage.connections()) == 1  # the victim's own: the attack opened none


@pytest.mark.parametrize("edge_name", ["buffered", "streaming"])
def test_0cl_body_sent_after_the_head_is_its_body(stages: Stages, edge_name: str) -> None:
    """0.CL: a GET declaring a length sends only its head, then - later - the body (a request)
    and a real request behind it. The edge never forwards the head without its body nor lets
    the body pass for a request: the upstream reads the GET with that body, then the next."""
    stage = stages.fresh(edge_name)
    target, hidden, second = unique("/ok/0cl"), unique("/ok/hidden"), unique("/ok/second")
    body = smuggled(hidden)
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        client.send(b"GET %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (target, HOST, len(body)))
        time.sleep(0.1)
        client.send(body + get(second))
        read_own_answers(client, [Framed(b"GET", target, body), Framed(b"GET", second)])
    after = victim(stage)
    assert_upstream_saw(stage, [(b"GET", target, body, True), (b"GET", second, b"", True), seen(after)])


EDGE_OWN = {
    "live": (b"GET", b"/_edge/live", 200),
    "live-post": (b"POST", b"/_edge/live", 405),
    "unknown": (b"GET", b"/_edge/unknown", 404),
    "options-asterisk": (b"OPTIONS", b"*", 204),
}


@pytest.mark.parametrize("endpoint", sorted(EDGE_OWN))
@pytest.mark.parametrize("split", [False, True], ids=["body-with-head", "body-later"])
def test_cl0_against_the_edges_own_answers(stages: Stages, endpoint: str, split: bool) -> None:
    """CL.0 against the requests the edge answers itself, which never read their body: the
    body (a request) is still framed by its length - consumed if it came with the head, or the
    connection closed if the answer went out first - so only the client's real next request
    ever reaches the upstream, never the one in the body."""
    stage = stages.fresh("buffered")
    method, target, status = EDGE_OWN[endpoint]
    hidden, second = unique("/ok/hidden"), unique("/ok/second")
    body = smuggled(hidden)
    head = b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (method, target, HOST, len(body))
    expected: list[Expected] = []
    with WireClient(stage.port, timeout=VICTIM_TIMEOUT) as client:
        if split:
            client.send(head)
            response = client.read_response()
            assert response.status == status, response.head
            assert response.values("connection") == [b"close"], response.head
            # The edge reads and drops what still comes (a lingering close), then closes.
            client.send(body + get(second))
            assert client.closed_by_peer()
        else:
            client.send(head + body + get(second))
            response = client.read_response()
            assert response.status == status, response.head
            assert_own_answer(client.read_response(), b"GET", second, 0)
            expected = [(b"GET", second, b"", True)]
    after = victim(stage)
    assert_upstream_saw(stage, [*expected, seen(after)])
