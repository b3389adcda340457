"""The server protocol bounds what it reads before a request head is complete."""

from __future__ import annotations

import contextlib
import json
import socket

from tests.servers import RunningEdge, UpstreamApp


def read_response(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def test_endless_header_line_is_refused_with_431_and_bounded_memory(edge: RunningEdge, upstream: UpstreamApp) -> None:
    before = len(upstream.record.requests)
    limit = edge.settings.max_header_bytes + 512 * 1024
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:
        # A head that never ends: without a bound the edge would keep waiting for its end,
        # and keep everything sent so far in memory.
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: edge.test\r\nX-Endless: ")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"a" * (limit + 65536))
        response = read_response(sock)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ")
    assert b"connection: close" in head.lower()
    envelope = json.loads(body)
    assert envelope["error"]["code"] == "headers_too_large"
    request_ids = [
        line.split(b": ", 1)[1].decode() for line in head.split(b"\r\n") if line.lower().startswith(b"x-request-id")
    ]
    assert request_ids == [envelope["error"]["request_id"]]
    assert len(upstream.record.requests) == before


def test_large_body_right_behind_a_small_head_is_not_mistaken_for_a_large_head(
    edge: RunningEdge, upstream: UpstreamApp
) -> None:
    body = b"x" * (3 * 1024 * 1024)
    request = b"POST /upload HTTP/1.1\r\nHost: edge.test\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    with socket.create_connection(("127.0.0.1", edge.port)) as sock:
        sock.sendall(request + body)
        response = read_response(sock)
    assert response.startswith(b"HTTP/1.1 200 ")
    assert json.loads(response.partition(b"\r\n\r\n")[2])["body_length"] == len(body)
