"""The edge forwards HTTP exchanges faithfully: methods, targets, bodies, framing, headers.

Every test talks to the real edge over loopback, and the edge to a real upstream. Requests
whose exact bytes matter (odd casing, chunking, HTTP/1.0, the target) are written on a raw
socket, and their responses are read from one, so no client library normalises what is
being checked.
"""

from __future__ import annotations

import email.utils
import hashlib
import ipaddress
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from edge.proxy.ingress import ForwardedRequest, parse_hop
from tests.forwarding_support import TRICKLE_FIRST, TRICKLE_SECOND, GateUpstream, start_gate_upstream
from tests.servers import (
    RawUpstream,
    RecordedRequest,
    RunningEdge,
    ServerThread,
    UpstreamApp,
    pattern_bytes,
    pattern_sha256,
    running_edge,
    start_edge,
)
from tests.wire import WireClient, WireResponse

LARGE = 32 * 1024 * 1024
FORWARDING_HEADERS = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded")


def wire_exchange(port: int, request: bytes, *, head_request: bool = False) -> WireResponse:
    with WireClient(port) as client:
        client.send(request)
        return client.read_response(head_request=head_request)


def upstream_saw(response: WireResponse | httpx.Response) -> dict[str, Any]:
    """The request as `/echo` on the upstream recorded it, from the echoed JSON."""
    status = response.status_code if isinstance(response, httpx.Response) else response.status
    assert status == 200
    echoed: dict[str, Any] = response.json()
    return echoed


def header_values(echoed: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in echoed["headers"] if key == name]


def header_names(echoed: dict[str, Any]) -> set[str]:
    return {key for key, _ in echoed["headers"]}


def find_recorded(upstream: UpstreamApp, token: str) -> RecordedRequest:
    matches = [r for r in upstream.record.requests if token.encode() in r.query_string]
    assert len(matches) == 1, f"the upstream saw {len(matches)} requests carrying {token}"
    return matches[0]


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trusted_edge(upstream_server: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    with running_edge(upstream_server[0].url, trusted_proxies=[ipaddress.ip_network("127.0.0.0/8")]) as running:
        yield running


@pytest.fixture(scope="module")
def trusted_chain_edge(upstream_server: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    networks = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8")]
    with running_edge(upstream_server[0].url, trusted_proxies=networks) as running:
        yield running


@pytest.fixture(scope="module")
def gate() -> Iterator[tuple[GateUpstream, RunningEdge]]:
    server, app = start_gate_upstream()
    running = start_edge(server.url)
    yield app, running
    running.server.stop()
    server.stop()


@pytest.fixture
def client(edge: RunningEdge) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=edge.url, timeout=20.0) as session:
        yield session


# -- 1. methods, raw target, query, body ------------------------------------------------------

RAW_PATH = b"/a%2Fb/%20c/%E2%82%AC"
RAW_QUERY = b"q=a%20b&slash=%2F&plus=1+2&euro=%E2%82%AC&empty=&flag"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "PROPFIND"])
def test_every_method_is_forwarded_with_raw_target_and_body(
    edge: RunningEdge, upstream: UpstreamApp, method: str
) -> None:
    token = f"token={method}-{uuid.uuid4().hex}"
    query = RAW_QUERY + b"&" + token.encode()
    body = b"" if method == "HEAD" else (method.encode() + bytes(range(256))) * 300
    request = (
        method.encode() + b" " + RAW_PATH + b"?" + query + b" HTTP/1.1\r\n"
        b"Host: methods.test\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body

    response = wire_exchange(edge.port, request, head_request=method == "HEAD")

    assert response.status == 200
    seen = find_recorded(upstream, token)
    assert seen.method == method
    assert seen.raw_path == RAW_PATH
    assert seen.query_string == query
    assert (seen.body_length, seen.body_sha256) == (len(body), hashlib.sha256(body).hexdigest())


# -- 2. large bodies stream both ways -----------------------------------------------------------


def test_large_upload_with_content_length(client: httpx.Client) -> None:
    response = client.post(
        "/upload",
        content=pattern_bytes(LARGE),
        headers={"Content-Length": str(LARGE), "Content-Type": "application/octet-stream"},
    )
    seen = upstream_saw(response)
    assert header_values(seen, "content-length") == [str(LARGE)]
    assert (seen["body_length"], seen["body_sha256"]) == (LARGE, pattern_sha256(LARGE))


def test_large_chunked_upload(client: httpx.Client) -> None:
    request = client.build_request("POST", "/upload", content=pattern_bytes(LARGE))
    assert request.headers["transfer-encoding"] == "chunked"  # the client really chunks it

    seen = upstream_saw(client.send(request))

    assert (seen["body_length"], seen["body_sha256"]) == (LARGE, pattern_sha256(LARGE))
    assert header_values(seen, "transfer-encoding") == ["chunked"]
    assert "content-length" not in header_names(seen)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_upload_reaches_upstream_before_the_client_has_finished(
    gate: tuple[GateUpstream, RunningEdge], framing: str
) -> None:
    app, running = gate
    app.reset()
    first = b"a" * 65536
    rest_size = 4 * 1024 * 1024
    observed: dict[str, bool] = {}

    def body() -> Iterator[bytes]:
        yield first
        # The rest does not exist until the upstream has seen the first part: an edge that
        # buffers the request body would wait here until the timeout.
        observed["upstream_had_first_part"] = app.first_body_chunk.wait(3.0)
        yield from pattern_bytes(rest_size)

    headers = {"Content-Length": str(len(first) + rest_size)} if framing == "content-length" else {}
    with httpx.Client(timeout=20.0) as session:
        response = session.post(running.url + "/gate", content=body(), headers=headers)

    assert observed == {"upstream_had_first_part": True}
    digest = hashlib.sha256(first)
    for part in pattern_bytes(rest_size):
        digest.update(part)
    assert response.json() == {"body_length": len(first) + rest_size, "body_sha256": digest.hexdigest()}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_large_download(client: httpx.Client, chunked: bool) -> None:
    digest = hashlib.sha256()
    size = 0
    path = f"/bytes/{LARGE}" + ("?chunked=1" if chunked else "")
    with client.stream("GET", path) as response:
        assert response.status_code == 200
        if chunked:
            assert response.headers.get_list("transfer-encoding") == ["chunked"]
            assert "content-length" not in response.headers
        else:
            assert response.headers.get_list("content-length") == [str(LARGE)]
            assert "transfer-encoding" not in response.headers
        for part in response.iter_raw():
            digest.update(part)
            size += len(part)
    assert size == LARGE
    assert digest.hexdigest() == pattern_sha256(LARGE)


# -- 3. responses pass on part by part, at once --------------------------------------------------


def test_event_stream_events_arrive_as_they_are_sent(client: httpx.Client) -> None:
    arrivals: list[tuple[float, bytes]] = []
    started = time.monotonic()
    with client.stream("GET", "/sse?n=3&interval=1.0") as response:
        assert response.headers["content-type"] == "text/event-stream"
        assert "content-length" not in response.headers
        for part in response.iter_raw():
            arrivals.append((time.monotonic() - started, part))
    ended = time.monotonic() - started

    assert b"".join(part for _, part in arrivals) == b"".join(
        f"id: {n}\ndata: event {n}\n\n".encode() for n in range(3)
    )
    first_event_at = next(at for at, part in arrivals if b"data: event 0" in part)
    second_event_at = next(at for at, part in arrivals if b"data: event 1" in part)
    assert first_event_at < 0.6, f"first event after {first_event_at:.2f}s"
    assert ended >= 1.9
    assert ended - first_event_at > 1.5
    assert second_event_at - first_event_at > 0.7


@pytest.mark.parametrize("query", ["", "length=1"], ids=["chunked", "content-length"])
def test_response_part_is_relayed_before_the_upstream_sends_the_rest(
    gate: tuple[GateUpstream, RunningEdge], query: str
) -> None:
    app, running = gate
    app.reset()
    received = b""
    first_part_at = None
    started = time.monotonic()
    with (
        httpx.Client(timeout=20.0) as session,
        session.stream("GET", running.url + "/trickle", params=query or None) as response,
    ):
        if query:
            assert response.headers["content-length"] == str(len(TRICKLE_FIRST + TRICKLE_SECOND))
        else:
            assert response.headers["transfer-encoding"] == "chunked"
        for part in response.iter_raw():
            received += part
            if first_part_at is None and received.startswith(TRICKLE_FIRST):
                first_part_at = time.monotonic() - started
                # The upstream sends the rest only now: a buffering edge would stall until
                # the upstream's release timeout, and the first part would arrive late.
                app.release.set()
    assert received == TRICKLE_FIRST + TRICKLE_SECOND
    assert first_part_at is not None
    assert first_part_at < 1.5, f"first part after {first_part_at:.2f}s"


# -- 4. responses without a body, informational ones, close-delimited ones ----------------------


def test_head_response_has_no_body_and_the_connection_stays_usable(edge: RunningEdge) -> None:
    with WireClient(edge.port) as wire:
        wire.send(b"HEAD /head HTTP/1.1\r\nHost: head.test\r\n\r\n")
        head = wire.read_response(head_request=True)
        assert head.status == 200
        assert head.values("content-length") == [b"1000"]
        assert not head.values("transfer-encoding")
        assert wire.unexpected_bytes() == b""

        wire.send(b"GET /echo?after=head HTTP/1.1\r\nHost: head.test\r\n\r\n")
        after = wire.read_response()
        assert after.status == 200
        assert after.json()["query_string"] == "after=head"


@pytest.mark.parametrize("status", [204, 304])
def test_bodyless_statuses_pass_through(edge: RunningEdge, status: int) -> None:
    with WireClient(edge.port) as wire:
        wire.send(b"GET /status/%d HTTP/1.1\r\nHost: status.test\r\n\r\n" % status)
        response = wire.read_response()
        assert response.status == status
        assert not response.values("transfer-encoding")
        assert response.values("content-length") in ([], [b"0"])
        assert wire.unexpected_bytes() == b""

        wire.send(b"GET /echo?after=%d HTTP/1.1\r\nHost: status.test\r\n\r\n" % status)
        after = wire.read_response()
        assert after.status == 200
        assert after.json()["query_string"] == f"after={status}"


def test_early_hints_are_not_forwarded_but_the_final_response_is(raw_edge: RunningEdge) -> None:
    with WireClient(raw_edge.port) as wire:
        wire.send(b"GET /informational HTTP/1.1\r\nHost: hints.test\r\n\r\n")
        response = wire.read_response()
        assert response.head.startswith(b"HTTP/1.1 200 "), response.head
        assert response.body == b"ok"
        assert not response.values("link")  # a field of the 103, not of the final response
        assert wire.unexpected_bytes() == b""


def test_close_delimited_response_arrives_whole(raw_edge: RunningEdge) -> None:
    with httpx.Client(timeout=10.0) as session:
        response = session.get(raw_edge.url + "/read-until-close")
    assert response.status_code == 200
    assert response.content == b"until the end"
    assert response.headers["content-type"] == "text/plain"


# -- 5. request header hygiene -----------------------------------------------------------------

REQUEST_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-connection",
}


@pytest.mark.parametrize(
    "connection",
    [b"keep-alive, X-Secret", b"Upgrade, X-Secret"],
    ids=["keep-alive", "connection-upgrade"],
)
def test_hop_by_hop_request_headers_do_not_reach_the_upstream(edge: RunningEdge, connection: bytes) -> None:
    response = wire_exchange(
        edge.port,
        b"GET /echo HTTP/1.1\r\n"
        b"Host: hygiene.test\r\n"
        b"Connection: " + connection + b"\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: h2c\r\n"
        b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"X-Secret: 1\r\n"
        b"X-Visible: yes\r\n\r\n",
    )
    seen = upstream_saw(response)
    leaked = header_names(seen) & (REQUEST_HOP_BY_HOP | {"x-secret"})
    assert leaked == set()
    assert header_values(seen, "x-visible") == ["yes"]
    assert header_values(seen, "host") == ["hygiene.test"]


def test_connection_tokens_match_whatever_the_casing(edge: RunningEdge) -> None:
    response = wire_exchange(
        edge.port,
        b"GET /echo HTTP/1.1\r\n"
        b"hOsT: casing.test\r\n"
        b"CoNNection: x-SECRET , X-oThEr-SeCrEt\r\n"
        b"X-sEcReT: 1\r\n"
        b"x-other-secret: 2\r\n"
        b"X-Visible: yes\r\n\r\n",
    )
    seen = upstream_saw(response)
    assert header_names(seen) & {"connection", "x-secret", "x-other-secret"} == set()
    assert header_values(seen, "x-visible") == ["yes"]
    assert header_values(seen, "host") == ["casing.test"]


@pytest.mark.parametrize(
    "connection",
    [
        b"X-Forwarded-For",
        b"keep-alive, x-forwarded-for, Host, Content-Length",
        b"Forwarded, X-Forwarded-Proto, X-FORWARDED-HOST",
    ],
)
def test_connection_cannot_remove_forwarding_headers_host_or_framing(edge: RunningEdge, connection: bytes) -> None:
    body = b"hello, upstream"
    response = wire_exchange(
        edge.port,
        b"POST /echo HTTP/1.1\r\n"
        b"Host: protected.test\r\n"
        b"Connection: " + connection + b"\r\n"
        b"X-Forwarded-For: 198.51.100.7\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body,
    )
    seen = upstream_saw(response)
    assert header_values(seen, "x-forwarded-for") == ["127.0.0.1"]
    assert header_values(seen, "x-forwarded-proto") == ["http"]
    assert header_values(seen, "x-forwarded-host") == ["protected.test"]
    assert header_values(seen, "forwarded") == ['for=127.0.0.1;proto=http;host="protected.test"']
    assert header_values(seen, "host") == ["protected.test"]
    assert header_values(seen, "content-length") == [str(len(body))]
    assert (seen["body_length"], seen["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    assert "connection" not in header_names(seen)


# -- 6. response header hygiene ---------------------------------------------------------------


def test_hop_by_hop_response_headers_are_dropped(edge: RunningEdge) -> None:
    response = wire_exchange(edge.port, b"GET /hop-by-hop HTTP/1.1\r\nHost: hop.test\r\n\r\n")
    assert response.status == 200
    names = {name.lower() for name, _ in response.headers}
    assert names & {b"x-internal-token", b"keep-alive", b"proxy-authenticate"} == set()
    assert response.values("connection") == []
    assert response.values("x-kept") == [b"yes"]
    assert response.body == b"{}"


def test_the_only_date_is_the_edges_own(edge: RunningEdge) -> None:
    response = wire_exchange(edge.port, b"GET /hop-by-hop HTTP/1.1\r\nHost: hop.test\r\n\r\n")
    dates = response.values("date")
    assert len(dates) == 1, dates
    assert dates != [b"Mon, 01 Jan 2024 00:00:00 GMT"]
    sent_at = email.utils.parsedate_to_datetime(dates[0].decode())
    assert abs((datetime.now(UTC) - sent_at).total_seconds()) < 60


def test_at_most_one_server_header(edge: RunningEdge) -> None:
    response = wire_exchange(edge.port, b"GET /hop-by-hop HTTP/1.1\r\nHost: hop.test\r\n\r\n")
    assert response.status == 200
    assert len(response.values("server")) <= 1, response.values("server")


def test_repeated_response_headers_arrive_intact_and_in_order(edge: RunningEdge) -> None:
    response = wire_exchange(edge.port, b"GET /cookies HTTP/1.1\r\nHost: cookies.test\r\n\r\n")
    assert response.status == 200
    assert response.values("set-cookie") == [
        b"a=1; Path=/",
        b"b=2; Path=/; HttpOnly",
        b"c=3, with comma; Path=/",
    ]
    assert response.values("x-multi") == [b"first", b"second"]


def test_repeated_response_headers_through_httpx(client: httpx.Client) -> None:
    response = client.get("/cookies")
    assert response.headers.get_list("set-cookie") == [
        "a=1; Path=/",
        "b=2; Path=/; HttpOnly",
        "c=3, with comma; Path=/",
    ]
    assert response.headers.get_list("x-multi") == ["first", "second"]


# -- 7. no cookie jar in the edge -----------------------------------------------------------


def test_cookies_are_not_kept_between_requests(edge: RunningEdge) -> None:
    with WireClient(edge.port) as wire:
        wire.send(b"GET /cookies HTTP/1.1\r\nHost: jar.test\r\n\r\n")
        assert len(wire.read_response().values("set-cookie")) == 3
        # The same client connection, the same (pooled) upstream connection: still no cookie.
        wire.send(b"GET /echo HTTP/1.1\r\nHost: jar.test\r\n\r\n")
        assert "cookie" not in header_names(upstream_saw(wire.read_response()))

    with httpx.Client(base_url=edge.url, timeout=10.0) as fresh:
        seen = upstream_saw(fresh.get("/echo"))
    assert "cookie" not in header_names(seen)


# -- 8. forwarding headers ------------------------------------------------------------------


def test_untrusted_peer_forwarding_headers_are_replaced(client: httpx.Client) -> None:
    seen = upstream_saw(
        client.get(
            "/echo",
            headers={
                "Host": "client.example:8443",
                "X-Forwarded-For": "203.0.113.66, 10.1.2.3",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "evil.example",
                "Forwarded": "for=203.0.113.66;proto=https;host=evil.example",
            },
        )
    )
    assert header_values(seen, "x-forwarded-for") == ["127.0.0.1"]
    assert header_values(seen, "x-forwarded-proto") == ["http"]
    assert header_values(seen, "x-forwarded-host") == ["client.example:8443"]
    assert header_values(seen, "forwarded") == ['for=127.0.0.1;proto=http;host="client.example:8443"']
    assert header_values(seen, "host") == ["client.example:8443"]


def test_trusted_peer_stops_at_the_first_untrusted_hop(trusted_edge: RunningEdge) -> None:
    with httpx.Client(timeout=10.0) as session:
        seen = upstream_saw(
            session.get(
                trusted_edge.url + "/echo",
                headers={"Host": "edge.test", "X-Forwarded-For": "203.0.113.9, 10.0.0.1"},
            )
        )
    assert header_values(seen, "x-forwarded-for") == ["10.0.0.1, 127.0.0.1"]
    assert header_values(seen, "forwarded") == ['for=10.0.0.1;proto=http;host="edge.test", for=127.0.0.1']
    assert header_values(seen, "x-forwarded-proto") == ["http"]
    assert header_values(seen, "x-forwarded-host") == ["edge.test"]


def test_trusted_chain_resolves_the_client_past_trusted_hops(trusted_chain_edge: RunningEdge) -> None:
    with httpx.Client(timeout=10.0) as session:
        seen = upstream_saw(
            session.get(
                trusted_chain_edge.url + "/echo",
                headers={"Host": "edge.test", "X-Forwarded-For": "203.0.113.9, 10.0.0.1"},
            )
        )
    assert header_values(seen, "x-forwarded-for") == ["203.0.113.9, 10.0.0.1, 127.0.0.1"]
    assert header_values(seen, "forwarded") == [
        'for=203.0.113.9;proto=http;host="edge.test", for=10.0.0.1, for=127.0.0.1'
    ]


def test_trusted_peer_proto_and_host_are_honoured(trusted_edge: RunningEdge) -> None:
    with httpx.Client(timeout=10.0) as session:
        seen = upstream_saw(
            session.get(
                trusted_edge.url + "/echo",
                headers={
                    "Host": "internal.test:8080",
                    "X-Forwarded-For": "198.51.100.20",
                    "X-Forwarded-Proto": "https",
                    "X-Forwarded-Host": "public.example",
                },
            )
        )
    assert header_values(seen, "x-forwarded-for") == ["198.51.100.20, 127.0.0.1"]
    assert header_values(seen, "x-forwarded-proto") == ["https"]
    assert header_values(seen, "x-forwarded-host") == ["public.example"]
    assert header_values(seen, "forwarded") == ['for=198.51.100.20;proto=https;host="public.example", for=127.0.0.1']
    assert header_values(seen, "host") == ["internal.test:8080"]


def test_trusted_peer_ipv6_client_is_quoted_in_forwarded(trusted_edge: RunningEdge) -> None:
    with httpx.Client(timeout=10.0) as session:
        seen = upstream_saw(
            session.get(
                trusted_edge.url + "/echo",
                headers={"Host": "edge.test", "X-Forwarded-For": "[2001:db8::1]:443"},
            )
        )
    assert header_values(seen, "x-forwarded-for") == ["2001:db8::1, 127.0.0.1"]
    assert header_values(seen, "forwarded") == ['for="[2001:db8::1]";proto=http;host="edge.test", for=127.0.0.1']


def test_forwarded_request_headers_quote_ipv6_and_the_host() -> None:
    forwarded = ForwardedRequest(chain=("2001:db8::1", "10.0.0.1", "::1"), proto="https", host=b'a"b\\c')
    assert forwarded.upstream_headers() == [
        (b"x-forwarded-for", b"2001:db8::1, 10.0.0.1, ::1"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b'a"b\\c'),
        (b"forwarded", b'for="[2001:db8::1]";proto=https;host="a\\"b\\\\c", for=10.0.0.1, for="[::1]"'),
    ]


def test_forwarded_request_headers_without_host() -> None:
    forwarded = ForwardedRequest(chain=("192.0.2.1",), proto="http", host=None)
    assert forwarded.upstream_headers() == [
        (b"x-forwarded-for", b"192.0.2.1"),
        (b"x-forwarded-proto", b"http"),
        (b"forwarded", b"for=192.0.2.1;proto=http"),
    ]


@pytest.mark.parametrize(
    ("hop", "expected"),
    [
        ("1.2.3.4", "1.2.3.4"),
        ("1.2.3.4:80", "1.2.3.4"),
        (" 10.0.0.1 ", "10.0.0.1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("garbage", None),
        ("", None),
        ("unknown", None),
        ("[2001:db8::1", None),
        ("1.2.3.4:80:90", None),
        ("300.1.1.1", None),
    ],
)
def test_parse_hop(hop: str, expected: str | None) -> None:
    parsed = parse_hop(hop)
    assert (str(parsed) if parsed is not None else None) == expected


# -- 9. upstream path prefix -----------------------------------------------------------------


def test_upstream_path_prefix_is_prepended(upstream_server: tuple[ServerThread, UpstreamApp]) -> None:
    with running_edge(upstream_server[0].url + "/prefix") as prefixed:
        response = wire_exchange(prefixed.port, b"GET /x?y=1 HTTP/1.1\r\nHost: prefix.test\r\n\r\n")
        encoded = wire_exchange(prefixed.port, b"GET /a%2Fb?y=%20 HTTP/1.1\r\nHost: prefix.test\r\n\r\n")
    seen = upstream_saw(response)
    assert (seen["raw_path"], seen["query_string"]) == ("/prefix/x", "y=1")
    seen = upstream_saw(encoded)
    assert (seen["raw_path"], seen["query_string"]) == ("/prefix/a%2Fb", "y=%20")


# -- 10. Host -----------------------------------------------------------------------------


def test_client_host_is_preserved(client: httpx.Client) -> None:
    seen = upstream_saw(client.get("/echo", headers={"Host": "app.example:9000"}))
    assert header_values(seen, "host") == ["app.example:9000"]


def test_http10_request_without_host_gets_the_upstream_authority(
    edge: RunningEdge, upstream_server: tuple[ServerThread, UpstreamApp]
) -> None:
    with WireClient(edge.port) as wire:
        wire.send(b"GET /echo?v=1.0 HTTP/1.0\r\n\r\n")
        response = wire.read_response()
    seen = upstream_saw(response)
    assert seen["query_string"] == "v=1.0"
    assert header_values(seen, "host") == [f"127.0.0.1:{upstream_server[0].port}"]
    assert header_values(seen, "x-forwarded-host") == []
    assert header_values(seen, "forwarded") == ["for=127.0.0.1;proto=http"]


def test_raw_upstream_sees_forwarded_request_line(raw_edge: RunningEdge, raw_upstream: RawUpstream) -> None:
    target = b"/plain/%b/%%7E%%2F?x=%%20" % uuid.uuid4().hex.encode()
    response = wire_exchange(raw_edge.port, b"GET " + target + b" HTTP/1.1\r\nHost: raw.test\r\n\r\n")
    assert response.status == 200
    assert response.body == b"ok"
    assert target in raw_upstream.requests_seen
