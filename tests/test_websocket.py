"""WebSocket sessions through the edge: handshake, messages, close codes, refusals.

Every test connects a real WebSocket client to the edge on loopback; the edge connects to
the real upstream (`tests.servers.UpstreamApp`), which echoes and records what it sees.
"""

from __future__ import annotations

import json
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin, Subprotocol

from tests.servers import RunningEdge, ServerThread, UpstreamApp, closed_port, pattern_bytes, running_edge

OPEN_TIMEOUT = 5.0


def ws_url(edge: RunningEdge, path: str) -> str:
    return f"ws://127.0.0.1:{edge.port}{path}"


def open_ws(
    edge: RunningEdge,
    path: str = "/ws/echo",
    *,
    subprotocols: list[Subprotocol] | None = None,
    origin: Origin | None = None,
    max_size: int = 1024 * 1024,
) -> ClientConnection:
    return connect(
        ws_url(edge, path),
        subprotocols=subprotocols,
        origin=origin,
        max_size=max_size,
        open_timeout=OPEN_TIMEOUT,
        close_timeout=5,
        proxy=None,
    )


def wait_for_close_record(upstream: UpstreamApp, expected: tuple[int, str], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if expected in upstream.record.websocket_closes:
            return
        time.sleep(0.02)
    pytest.fail(f"upstream never recorded close {expected}; it saw {upstream.record.websocket_closes}")


def test_text_messages_round_trip(edge: RunningEdge) -> None:
    with open_ws(edge) as ws:
        for text in ("hello", "", "ünïcødé ✓", "x" * 10_000):
            ws.send(text)
            echoed = ws.recv(timeout=5)
            assert isinstance(echoed, str)
            assert echoed == text


def test_binary_messages_round_trip(edge: RunningEdge) -> None:
    with open_ws(edge) as ws:
        for payload in (b"\x00\x01\x02\xff", bytes(range(256)) * 4):
            ws.send(payload)
            echoed = ws.recv(timeout=5)
            assert isinstance(echoed, bytes), "a binary frame came back as text"
            assert echoed == payload


def test_text_and_binary_keep_their_type_and_order(edge: RunningEdge) -> None:
    with open_ws(edge) as ws:
        ws.send("one")
        ws.send(b"two")
        ws.send("three")
        received = [ws.recv(timeout=5) for _ in range(3)]
    assert received == ["one", b"two", "three"]


def test_client_is_accepted_with_the_subprotocol_the_upstream_chose(edge: RunningEdge) -> None:
    offered = [Subprotocol("chat.v1"), Subprotocol("chat.v2")]
    with open_ws(edge, subprotocols=offered) as ws:
        # The upstream prefers chat.v2 although the client listed chat.v1 first.
        assert ws.subprotocol == "chat.v2"
        assert ws.response is not None
        assert ws.response.headers.get_all("Sec-WebSocket-Protocol") == ["chat.v2"]


def test_no_subprotocol_is_invented_when_none_is_offered(edge: RunningEdge) -> None:
    with open_ws(edge) as ws:
        assert ws.subprotocol is None
        assert ws.response is not None
        assert "Sec-WebSocket-Protocol" not in ws.response.headers


def test_client_origin_reaches_the_upstream(upstream_server: tuple[ServerThread, UpstreamApp]) -> None:
    with (
        running_edge(upstream_server[0].url, cors_allow_origins=["https://app.example.com"]) as edge,
        open_ws(edge, origin=Origin("https://app.example.com")) as ws,
    ):
        assert ws.response is not None
        assert ws.response.headers.get("x-upstream-saw-origin") == "https://app.example.com"
        ws.send("still works")
        assert ws.recv(timeout=5) == "still works"


def test_client_close_code_and_reason_reach_the_upstream(edge: RunningEdge, upstream: UpstreamApp) -> None:
    with open_ws(edge) as ws:
        ws.send("before closing")
        assert ws.recv(timeout=5) == "before closing"
        ws.close(4001, "bye")
    wait_for_close_record(upstream, (4001, "bye"))


def test_upstream_close_code_and_reason_reach_the_client(edge: RunningEdge) -> None:
    with open_ws(edge) as ws:
        ws.send("close:4002:done")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None, "the client got no close frame"
    assert closed.value.rcvd.code == 4002
    assert closed.value.rcvd.reason == "done"


def test_upstream_refusal_is_relayed_as_the_handshake_response(edge: RunningEdge) -> None:
    with pytest.raises(InvalidStatus) as refused:
        open_ws(edge, "/ws/reject")
    response = refused.value.response
    assert response.status_code == 401
    assert response.headers.get("content-type") == "application/json"
    assert json.loads(response.body or b"null") == {"denied": True}


def test_unreachable_upstream_rejects_the_handshake_with_502_envelope() -> None:
    with running_edge(f"http://127.0.0.1:{closed_port()}") as dead_edge:
        started = time.monotonic()
        with pytest.raises(InvalidStatus) as refused:
            open_ws(dead_edge)
        elapsed = time.monotonic() - started
    response = refused.value.response
    assert response.status_code == 502
    assert response.headers.get("content-type") == "application/json"
    body = json.loads(response.body or b"null")
    assert isinstance(body, dict)
    assert set(body) == {"error"}
    assert body["error"]["code"] == "upstream_unavailable"
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    assert "request_id" in body["error"]
    # A refused connection is known at once: no waiting for the connect timeout.
    assert elapsed < 2.0


def test_large_binary_message_round_trips_intact(edge: RunningEdge) -> None:
    size = 1024 * 1024
    payload = b"".join(pattern_bytes(size))
    with open_ws(edge, max_size=4 * size) as ws:
        ws.send(payload)
        echoed = ws.recv(timeout=10)
    assert isinstance(echoed, bytes)
    assert len(echoed) == size
    assert echoed == payload


def test_sessions_are_independent(edge: RunningEdge) -> None:
    with open_ws(edge) as first, open_ws(edge) as second:
        first.send("for the first")
        second.send("for the second")
        assert second.recv(timeout=5) == "for the second"
        assert first.recv(timeout=5) == "for the first"
