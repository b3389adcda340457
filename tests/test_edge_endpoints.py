"""The edge's own `/_edge` namespace makes no redirects: anything but `/_edge/live` and
`/_edge/ready` is a 404 in the envelope, whatever `Host` the client claims.

Starlette's trailing-slash redirect would build an absolute `Location` from the client's
`Host` (`/_edge` to `http://evil.example/_edge/`), an open redirect. The requests are
written on a raw socket, so the hostile `Host` is exactly what the edge receives.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Iterator

import pytest

from tests.concerns_support import assert_envelope
from tests.servers import RunningEdge, UpstreamApp, running_edge
from tests.wire import WireClient, WireResponse

HOSTILE_HOST = "evil.example"


@pytest.fixture(scope="module")
def trusting_edge(upstream_url: str) -> Iterator[RunningEdge]:
    with running_edge(upstream_url, trusted_proxies=[ipaddress.ip_network("127.0.0.0/8")]) as edge:
        yield edge


def raw_get(edge: RunningEdge, target: str, extra: str = "") -> WireResponse:
    with WireClient(edge.port) as client:
        client.send(f"GET {target} HTTP/1.1\r\nHost: {HOSTILE_HOST}\r\n{extra}\r\n".encode())
        return client.read_response()


def text_headers(response: WireResponse) -> list[tuple[str, str]]:
    return [(name.decode().lower(), value.decode()) for name, value in response.headers]


@pytest.mark.parametrize("target", ["/_edge", "/_edge/", "/_edge/live/", "/_edge/ready/", "/_edge?x=1", "/_edge/nope"])
def test_edge_paths_other_than_its_endpoints_are_404_without_a_redirect(
    edge: RunningEdge, upstream: UpstreamApp, target: str
) -> None:
    marker = uuid.uuid4().hex
    separator = "&" if "?" in target else "?"
    response = raw_get(edge, f"{target}{separator}marker={marker}")
    assert response.status == 404
    assert response.values("location") == []
    assert HOSTILE_HOST.encode() not in response.head + response.body
    assert_envelope(response.status, text_headers(response), response.body, "not_found")
    assert [r for r in upstream.record.requests if marker.encode() in r.query_string] == []  # never forwarded


def test_forwarded_host_from_a_trusted_proxy_makes_no_redirect_either(trusting_edge: RunningEdge) -> None:
    response = raw_get(trusting_edge, "/_edge", f"X-Forwarded-Host: {HOSTILE_HOST}\r\nX-Forwarded-Proto: https\r\n")
    assert response.status == 404
    assert response.values("location") == []
    assert_envelope(response.status, text_headers(response), response.body, "not_found")


@pytest.mark.parametrize("target", ["/_edge/live", "/_edge/ready"])
def test_the_endpoints_themselves_still_answer(edge: RunningEdge, target: str) -> None:
    response = raw_get(edge, target)
    assert response.status == 200
    assert response.values("location") == []
