"""The edge's own HTTP/1.1 server protocol: what it writes back, and the uvicorn it is built for.

Refusals are in tests/test_request_heads.py, smuggling in tests/test_smuggling.py, slow
clients in tests/test_slow_clients.py; this file covers the plain server behaviour the
ASGI application relies on.
"""

from __future__ import annotations

import hashlib
import json
from urllib.parse import unquote_to_bytes

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from edge.server.serve import server_config
from edge.settings import EdgeSettings
from tests.servers import RunningEdge, ServerThread, pattern_sha256
from tests.wire import WireClient


def test_uvicorn_is_the_version_the_protocol_was_written_against() -> None:
    # edge/server/protocol.py relies on how uvicorn 0.54.0 treats its HTTP protocols (the
    # constructor, server_state.connections/tasks/default_headers, shutdown(), the WebSocket
    # hand-over). On an upgrade, re-read that module's docstring against the new uvicorn,
    # run this suite, then move this pin.
    assert uvicorn.__version__ == "0.54.0"


def test_keep_alive_serves_requests_one_after_another_on_one_connection(edge: RunningEdge) -> None:
    with WireClient(edge.port) as wire:
        for number in range(3):
            wire.send(f"GET /echo?n={number} HTTP/1.1\r\nHost: edge\r\n\r\n".encode())
            response = wire.read_response()
            assert response.status == 200
            assert response.values("connection") == []
            assert json.loads(response.body)["query_string"] == f"n={number}"
        wire.send(b"GET /echo HTTP/1.1\r\nHost: edge\r\nConnection: close\r\n\r\n")
        response = wire.read_response()
        assert response.values("connection") == [b"close"]
        assert wire.closed_by_peer()


def test_http10_client_gets_a_close_delimited_body_never_chunked(edge: RunningEdge) -> None:
    size = 300_000
    with WireClient(edge.port) as wire:
        # The upstream streams this one chunked; HTTP/1.0 has no chunking.
        wire.send(f"GET /bytes/{size}?chunked=1 HTTP/1.0\r\nHost: edge\r\n\r\n".encode())
        response = wire.read_response()
    assert response.status == 200
    assert response.values("transfer-encoding") == []
    assert response.values("connection") == [b"close"]
    assert len(response.body) == size


def test_expect_100_continue_is_answered_before_the_body_is_sent(edge: RunningEdge) -> None:
    body = b"x" * 1000
    with WireClient(edge.port) as wire:
        wire.send(
            b"POST /echo HTTP/1.1\r\nHost: edge\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n\r\n",
        )
        interim = wire.read_response()
        assert interim.status == 100
        wire.send(body)
        response = wire.read_response()
    assert response.status == 200
    assert json.loads(response.body)["body_length"] == len(body)


def test_a_large_response_arrives_whole_through_the_protocol(edge: RunningEdge) -> None:
    size = 5_000_000
    with WireClient(edge.port) as wire:
        wire.send(f"GET /bytes/{size} HTTP/1.1\r\nHost: edge\r\n\r\n".encode())
        response = wire.read_response()
    assert response.values("content-length") == [str(size).encode()]
    assert hashlib.sha256(response.body).hexdigest() == pattern_sha256(size)


async def answers_with_the_header_it_is_asked_for(scope: Scope, receive: Receive, send: Send) -> None:
    """An application that would split its own response, were the server to let it."""
    if scope["type"] != "http":
        return
    name, _, value = scope["query_string"].partition(b"=")
    headers = [(unquote_to_bytes(name), unquote_to_bytes(value)), (b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize(
    "query",
    [b"x-a=1%0D%0Aset-cookie:%20injected", b"x%20a=1", b"x:a=1", b"=1"],
    ids=["value-with-crlf", "name-with-space", "name-with-colon", "empty-name"],
)
def test_a_response_header_that_would_split_the_response_is_never_written(query: bytes) -> None:
    config = server_config(EdgeSettings(), answers_with_the_header_it_is_asked_for, lifespan="off")
    server = ServerThread(config).start()
    try:
        with WireClient(server.port) as wire:
            wire.send(b"GET /?" + query + b" HTTP/1.1\r\nHost: edge\r\n\r\n")
            response = wire.read_response()
            assert wire.closed_by_peer()
    finally:
        server.stop()
    assert response.status == 500
    assert b"injected" not in response.head
    assert json.loads(response.body)["error"]["code"] == "internal_error"
