"""Request header hygiene at the ingress: the non-standard client-address and URL-override
headers, and every header whose name has an underscore, never reach the upstream, whichever
peer sent them; only the standard forwarding headers are believed (from trusted proxies)
and re-issued.

Requests are written on a raw socket, so the header names and their casing are exactly what
the test says; the real upstream records what arrives.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Iterator

import pytest
from websockets.sync.client import connect

from tests.servers import RecordedRequest, RunningEdge, ServerThread, UpstreamApp, running_edge
from tests.wire import WireClient

# The claims no peer may make: written canonically, lower-cased and upper-cased.
CLIENT_CLAIMS = [
    "X-Real-IP",
    "True-Client-IP",
    "X-Client-IP",
    "CF-Connecting-IP",
    "Fastly-Client-IP",
    "X-Cluster-Client-IP",
    "X-Forwarded-Port",
    "X-Forwarded-Prefix",
    "X-Forwarded-Server",
    "X-Forwarded-Scheme",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-Original-Host",
    "X-Host",
]
SPELLINGS = [spelling for name in CLIENT_CLAIMS for spelling in (name, name.lower(), name.upper())]

# Underscore spellings, which CGI and WSGI servers read as the dashed ones.
UNDERSCORED = [
    ("X_Forwarded_For", "203.0.113.66"),
    ("x_forwarded_proto", "https"),
    ("X_FORWARDED_HOST", "evil.example"),
    ("X_Real_IP", "203.0.113.67"),
    ("X-Forwarded_For", "203.0.113.68"),
    ("X_Request_ID", "chosen-by-the-client"),
    ("Foo_Bar", "1"),
    ("_Leading", "1"),
    ("Trailing_", "1"),
]

# Kept, in this order, repeats included; names close to a dropped one are not dropped.
ORDINARY = [
    ("host", "hygiene.test"),
    ("user-agent", "wire/1"),
    ("x-a", "1"),
    ("accept", "application/json"),
    ("x-hostname", "kept"),
    ("x-real-ip-hint", "kept"),
    ("x-http-method-override", "DELETE"),  # out of scope: the app decides about it
    ("x-a", "2"),
    ("x-forwarded-ports", "kept"),
]

# Added by the edge itself: the re-issued forwarding headers, the request id, the trace.
EDGE_ADDED = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-request-id", "traceparent"}


@pytest.fixture(scope="module")
def trusting_edge(upstream_url: str) -> Iterator[RunningEdge]:
    with running_edge(upstream_url, trusted_proxies=[ipaddress.ip_network("127.0.0.0/8")]) as edge:
        yield edge


@pytest.fixture(params=["untrusted-peer", "trusted-peer"])
def any_edge(request: pytest.FixtureRequest) -> RunningEdge:
    edge: RunningEdge = request.getfixturevalue("edge" if request.param == "untrusted-peer" else "trusting_edge")
    return edge


def forward(edge: RunningEdge, upstream: UpstreamApp, headers: list[tuple[str, str]]) -> RecordedRequest:
    """Sends a GET with exactly these header lines; returns what the upstream received."""
    token = uuid.uuid4().hex
    head = f"GET /echo?token={token} HTTP/1.1\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers)
    with WireClient(edge.port) as client:
        client.send(head.encode("latin-1") + b"\r\n")
        assert client.read_response().status == 200
    [seen] = [request for request in upstream.record.requests if request.query_string == f"token={token}".encode()]
    return seen


def arrived(seen: RecordedRequest) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in seen.headers]


def assert_only_ordinary_headers_and_the_edges(seen: RecordedRequest) -> None:
    assert [pair for pair in arrived(seen) if pair[0] not in EDGE_ADDED] == ORDINARY
    names = [name for name, _ in arrived(seen)]
    for name in EDGE_ADDED:
        assert names.count(name) == 1, (name, arrived(seen))


def test_client_address_and_url_claims_never_reach_the_upstream(any_edge: RunningEdge, upstream: UpstreamApp) -> None:
    claims = [(name, f"claim-{number}") for number, name in enumerate(SPELLINGS)]
    # Interleaved with the ordinary headers, so dropping one cannot shift the others.
    headers = [header for pair in zip(ORDINARY, claims[: len(ORDINARY)], strict=True) for header in pair]
    seen = forward(any_edge, upstream, headers + claims[len(ORDINARY) :])
    assert {name for name, _ in arrived(seen)} & {name.lower() for name in CLIENT_CLAIMS} == set()
    assert not any(value.startswith("claim-") for _, value in arrived(seen))
    assert_only_ordinary_headers_and_the_edges(seen)
    assert seen.header(b"x-forwarded-for") == [b"127.0.0.1"]
    assert seen.header(b"x-forwarded-host") == [b"hygiene.test"]


def test_underscored_header_names_are_dropped_and_never_pose_as_forwarding_headers(
    any_edge: RunningEdge, upstream: UpstreamApp
) -> None:
    seen = forward(any_edge, upstream, ORDINARY + UNDERSCORED)
    assert [name for name, _ in arrived(seen) if "_" in name] == []
    assert_only_ordinary_headers_and_the_edges(seen)
    # Not believed from a trusted proxy either: the client is the peer, the rest the Host.
    assert seen.header(b"x-forwarded-for") == [b"127.0.0.1"]
    assert seen.header(b"x-forwarded-proto") == [b"http"]
    assert seen.header(b"x-forwarded-host") == [b"hygiene.test"]
    assert seen.header(b"x-request-id") != [b"chosen-by-the-client"]


def test_a_trusted_proxys_standard_forwarding_headers_are_still_believed(
    trusting_edge: RunningEdge, upstream: UpstreamApp
) -> None:
    forwarding = [
        ("X-Forwarded-For", "198.51.100.20"),
        ("X-Real-IP", "203.0.113.1"),
        ("X-Forwarded-Proto", "https"),
        ("X_Forwarded_Proto", "http"),
        ("X-Forwarded-Host", "public.example"),
        ("X-Forwarded-Port", "8443"),
    ]
    seen = forward(trusting_edge, upstream, ORDINARY + forwarding)
    assert_only_ordinary_headers_and_the_edges(seen)
    assert seen.header(b"x-forwarded-for") == [b"198.51.100.20, 127.0.0.1"]
    assert seen.header(b"x-forwarded-proto") == [b"https"]
    assert seen.header(b"x-forwarded-host") == [b"public.example"]
    assert seen.header(b"forwarded") == [b'for=198.51.100.20;proto=https;host="public.example", for=127.0.0.1']


@pytest.fixture(scope="module")
def scripted_edge(scripted: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    with running_edge(scripted[0].url) as edge:
        yield edge


def test_websocket_handshake_is_cleaned_the_same_way(
    scripted_edge: RunningEdge, scripted: tuple[ServerThread, UpstreamApp]
) -> None:
    path = f"/ws/{uuid.uuid4().hex}"
    with connect(
        f"ws://127.0.0.1:{scripted_edge.port}{path}",
        additional_headers=[("X-Real-IP", "203.0.113.1"), ("X_Forwarded_For", "203.0.113.2"), ("X-Visible", "yes")],
        open_timeout=5,
    ) as websocket:
        websocket.send("hello")
        assert websocket.recv(timeout=5) == "hello"
    [seen] = [seen for seen in scripted[1].record.websockets if seen.raw_path == path.encode()]
    names = {name for name, _ in seen.headers}
    assert names & {b"x-real-ip", b"x_forwarded_for"} == set()
    assert seen.header(b"x-visible") == [b"yes"]
    assert seen.header(b"x-forwarded-for") == [b"127.0.0.1"]
