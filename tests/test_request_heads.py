"""Every row of docs/proxy.md "Framing the edge can prove", with raw bytes through a real edge
in front of the recording upstream.

A refusal must be the error envelope with the exact status and code, the security headers,
an `x-request-id` (the client's own valid `X-Request-ID` echoed, otherwise one the edge made),
`connection: close`, and a closed connection with nothing after the one response; and the
upstream must never see the request. Every request carries a unique marker (in its path, or
its `X-Request-ID` where the target cannot carry one), so `upstream.record` tells this test's
requests from every other's; a module-wide check at the end looks once more, after a pause,
for refused requests that reached the upstream late.

The rows the edge accepts are checked the other way round: forwarded once, with the method,
origin-form path and query, `Host` and body the rule says.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.servers import RecordedRequest, RunningEdge, UpstreamApp
from tests.test_failures import assert_raw_envelope
from tests.wire import RawExchange, WireResponse, raw_exchange, read_until_closed

# Time for a request the edge should not have forwarded to reach the upstream anyway. The
# edge answers a forwarded request only after the upstream recorded it, so a refusal that
# arrives is already strong evidence; the pause covers a request forwarded *and* refused.
SETTLE = 0.05
LATE_SETTLE = 0.3

UUID7 = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
ALLOWED_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


# -- helpers ------------------------------------------------------------------------------------------


class Probe:
    """One request's marker: its path is `/rh/<marker>`, its `X-Request-ID` is `rh-<marker>`."""

    def __init__(self) -> None:
        self.marker = uuid.uuid4().hex
        self.path = f"/rh/{self.marker}"
        self.request_id = f"rh-{self.marker}"

    def render(self, template: bytes) -> bytes:
        return template.replace(b"{path}", self.path.encode()).replace(b"{id}", self.request_id.encode())

    def carried_by(self, record: RecordedRequest) -> bool:
        marker = self.marker.encode()
        return (
            marker in record.raw_path
            or marker in record.query_string
            or any(marker in value for _, value in record.headers)
        )


@pytest.fixture(scope="module")
def refused_probes(upstream: UpstreamApp) -> Iterator[list[Probe]]:
    """Every probe the edge refused; none of them may ever reach the upstream, not even late."""
    probes: list[Probe] = []
    yield probes
    time.sleep(LATE_SETTLE)
    late = [record.raw_path for record in upstream.record.requests if any(p.carried_by(record) for p in probes)]
    assert late == [], f"refused requests reached the upstream: {late}"


def forwarded(upstream: UpstreamApp, probe: Probe) -> list[RecordedRequest]:
    return [record for record in upstream.record.requests if probe.carried_by(record)]


def expected_security_headers(edge: RunningEdge) -> dict[bytes, bytes]:
    return {
        b"strict-transport-security": f"max-age={edge.settings.hsts_max_age}; includeSubDomains".encode(),
        b"x-content-type-options": b"nosniff",
        b"x-frame-options": b"DENY",
        b"referrer-policy": b"no-referrer",
        b"cross-origin-opener-policy": b"same-origin",
        b"cross-origin-resource-policy": b"same-origin",
    }


def assert_refused(
    edge: RunningEdge,
    upstream: UpstreamApp,
    refused_probes: list[Probe],
    request: bytes,
    status: int,
    code: str,
    *,
    probe: Probe,
    echoed_id: str | None,
) -> WireResponse:
    """`request` (already rendered for `probe`) is refused with `status`/`code` in the envelope,
    with everything a refusal carries, and never reaches the upstream."""
    refused_probes.append(probe)
    exchange = raw_exchange(edge.port, request, timeout=3.0)
    response = exchange.response
    assert_raw_envelope(response, status, code)
    assert exchange.closed, "a refusal must close the connection"
    assert response.values("connection") == [b"close"], response.head
    assert response.values("cache-control") == [b"no-store"], response.head
    for name, value in expected_security_headers(edge).items():
        assert response.values(name.decode()) == [value], (name, response.head)
    assert response.values("content-security-policy"), response.head
    assert b"default-src 'none'" in response.values("content-security-policy")[0]
    # One response, then the end: nothing of the refused bytes was answered a second time.
    length = int(response.values("content-length")[0])
    assert len(response.body) == length, exchange.data
    ids = response.values("x-request-id")
    assert len(ids) == 1, response.head
    assert json.loads(response.body)["error"]["request_id"] == ids[0].decode()
    if echoed_id is not None:
        assert ids[0] == echoed_id.encode(), (ids, echoed_id)
    else:
        assert UUID7.fullmatch(ids[0]), ids
    time.sleep(SETTLE)
    assert forwarded(upstream, probe) == [], "a refused request reached the upstream"
    return response


def refuse(
    edge: RunningEdge,
    upstream: UpstreamApp,
    refused_probes: list[Probe],
    template: bytes,
    status: int,
    code: str,
) -> WireResponse:
    """`template` with `{path}` and `{id}` (its `X-Request-ID`, which must come back) filled in."""
    probe = Probe()
    echoed = probe.request_id if b"{id}" in template else None
    return assert_refused(
        edge, upstream, refused_probes, probe.render(template), status, code, probe=probe, echoed_id=echoed
    )


def forward_one(edge: RunningEdge, upstream: UpstreamApp, template: bytes) -> tuple[RawExchange, RecordedRequest]:
    """`template` is answered 200 by the upstream, which saw it exactly once."""
    probe = Probe()
    exchange = raw_exchange(edge.port, probe.render(template), timeout=3.0)
    assert exchange.response.status == 200, exchange.data
    records = forwarded(upstream, probe)
    assert len(records) == 1, records
    return exchange, records[0]


# -- versions ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        pytest.param(b"GET {path} HTTP/2.0\r\nHost: a\r\nX-Request-ID: {id}\r\n\r\n", id="HTTP/2.0"),
        pytest.param(b"GET {path} HTTP/0.9\r\nHost: a\r\nX-Request-ID: {id}\r\n\r\n", id="HTTP/0.9"),
        pytest.param(b"GET {path}\r\n\r\n", id="HTTP/0.9-simple-request"),
        # Versions llhttp itself cannot parse, the HTTP/2 preface among them: refused at the
        # request line, before any field is read (so no client id to echo).
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="HTTP/2-preface"),
        pytest.param(b"GET {path} HTTP/3.0\r\nHost: a\r\n\r\n", id="HTTP/3.0"),
        pytest.param(b"GET {path} HTTP/1.2\r\nHost: a\r\n\r\n", id="HTTP/1.2"),
    ],
)
def test_version_other_than_1_0_or_1_1_is_505(
    edge: RunningEdge, upstream: UpstreamApp, refused_probes: list[Probe], template: bytes
) -> None:
    before = len(upstream.record.requests)
    refuse(edge, upstream, refused_probes, template, 505, "http_version_not_supported")
    # The preface carries no marker: nothing at all may have been forwarded for it.
    assert not any(record.method == "PRI" for record in upstream.record.requests[before:])


# -- CONNECT ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        pytest.param(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nX-Request-ID: {id}\r\n\r\n", id="authority-form"),
        pytest.param(b"CONNECT {path} HTTP/1.1\r\nHost: a\r\nX-Request-ID: {id}\r\n\r\n", id="origin-form"),
    ],
)
def test_connect_is_501(edge: RunningEdge, upstream: UpstreamApp, refused_probes: list[Probe], template: bytes) -> None:
    refuse(edge, upstream, refused_probes, template, 501, "not_implemented")


# -- Host --------------------------------------------------------------------------------------------------


BAD_HOST_HEADS = {
    "two-equal-hosts": b"Host: a\r\nHost: a\r\n",
    "two-different-hosts": b"Host: a\r\nHost: b\r\n",
    "no-host-in-1.1": b"",
    "space": b"Host: a b\r\n",
    "slash": b"Host: a/b\r\n",
    "userinfo": b"Host: u@a\r\n",
    "empty": b"Host: \r\n",
    "empty-port": b"Host: a:\r\n",
    "port-above-65535": b"Host: a:99999\r\n",
    "unclosed-ipv6": b"Host: [::1\r\n",
    "bad-ipv6": b"Host: [::g]\r\n",
    "ipv6-without-brackets": b"Host: ::1\r\n",
    "non-ascii": "Host: h\u00e9te\r\n".encode(),
    "300-char-label": b"Host: " + b"a" * 300 + b"\r\n",
    "64-char-label": b"Host: " + b"a" * 64 + b".b\r\n",
    "empty-label": b"Host: a..b\r\n",
}


@pytest.mark.parametrize("fields", list(BAD_HOST_HEADS.values()), ids=list(BAD_HOST_HEADS))
def test_missing_repeated_or_malformed_host_is_400(
    edge: RunningEdge, upstream: UpstreamApp, refused_probes: list[Probe], fields: bytes
) -> None:
    template = b"GET {path} HTTP/1.1\r\nX-Request-ID: {id}\r\n" + fields + b"\r\n"
    refuse(edge, upstream, refused_probes, template, 400, "bad_request")


@pytest.mark.parametrize(
    "host",
    [
        b"a",
        b"a.b.c",
        b"a:8080",
        b"[::1]:80",
        b"[::1]",
        b"1.2.3.4",
        b"my_service",
        b"a.b.",
        b"Edge.Example",
        b"a" * 63 + b".b",
    ],
)
def test_valid_host_is_forwarded_with_that_host(edge: RunningEdge, upstream: UpstreamApp, host: bytes) -> None:
    template = b"GET {path}?q=1 HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
    _, record = forward_one(edge, upstream, template)
    assert record.method == "GET"
    assert record.query_string == b"q=1"
    assert record.header(b"host") == [host]


def test_host_with_trailing_whitespace_is_forwarded(edge: RunningEdge, upstream: UpstreamApp) -> None:
    _, record = forward_one(edge, upstream, b"GET {path} HTTP/1.1\r\nHost: a \r\nConnection: close\r\n\r\n")
    assert record.header(b"host") == [b"a"]


def test_http_1_0_without_host_is_forwarded_with_the_upstreams_authority(
    edge: RunningEdge, upstream: UpstreamApp
) -> None:
    exchange, record = forward_one(edge, upstream, b"GET {path}?v=10 HTTP/1.0\r\n\r\n")
    assert exchange.closed  # HTTP/1.0: the response ends the connection
    assert record.query_string == b"v=10"
    assert record.header(b"host") == [edge.proxy.pool.origin.authority]


def test_http_1_0_with_a_valid_host_keeps_it(edge: RunningEdge, upstream: UpstreamApp) -> None:
    _, record = forward_one(edge, upstream, b"GET {path} HTTP/1.0\r\nHost: a:81\r\n\r\n")
    assert record.header(b"host") == [b"a:81"]


# -- absolute-form ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "host", "path_suffix", "query"),
    [
        pytest.param(b"http://a{path}/x?q=1&r=2", b"a", b"/x", b"q=1&r=2", id="path-and-query"),
        pytest.param(b"https://a:8080{path}", b"a:8080", b"", b"", id="https-with-port"),
        pytest.param(b"HTTP://A{path}", b"a", b"", b"", id="case-insensitive-scheme-and-host"),
        pytest.param(b"http://[::1]:80{path}?z", b"[::1]:80", b"", b"z", id="ipv6"),
    ],
)
def test_absolute_form_agreeing_with_host_is_forwarded_as_origin_form(
    edge: RunningEdge, upstream: UpstreamApp, target: bytes, host: bytes, path_suffix: bytes, query: bytes
) -> None:
    probe = Probe()
    request = b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
    exchange = raw_exchange(edge.port, probe.render(request), timeout=3.0)
    response = exchange.response
    assert response.status == 200, exchange.data
    records = forwarded(upstream, probe)
    assert len(records) == 1
    assert records[0].raw_path == probe.path.encode() + path_suffix
    assert records[0].query_string == query
    assert records[0].header(b"host") == [host]


def test_absolute_form_without_a_path_is_forwarded_as_slash(edge: RunningEdge, upstream: UpstreamApp) -> None:
    probe = Probe()
    request = b"GET http://a?m={id} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    exchange = raw_exchange(edge.port, probe.render(request), timeout=3.0)
    response = exchange.response
    assert response.status == 200, exchange.data
    records = forwarded(upstream, probe)
    assert [(r.raw_path, r.query_string) for r in records] == [(b"/", b"m=" + probe.request_id.encode())]


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"GET http://b{path} HTTP/1.1\r\nHost: a\r\n", id="other-host"),
        pytest.param(b"GET http://a:80{path} HTTP/1.1\r\nHost: a\r\n", id="other-port"),
        pytest.param(b"GET http://u@a{path} HTTP/1.1\r\nHost: a\r\n", id="userinfo"),
        pytest.param(b"GET http://u@a{path} HTTP/1.1\r\nHost: u@a\r\n", id="userinfo-in-both"),
        pytest.param(b"GET http://{path} HTTP/1.1\r\nHost: a\r\n", id="empty-authority"),
        pytest.param(b"GET http://a{path} HTTP/1.0\r\n", id="http-1.0-without-host"),
        pytest.param(b"GET ftp://a{path} HTTP/1.1\r\nHost: a\r\n", id="other-scheme"),
    ],
)
def test_absolute_form_disagreeing_with_host_is_400(
    edge: RunningEdge, upstream: UpstreamApp, refused_probes: list[Probe], head: bytes
) -> None:
    request_line, _, fields = head.partition(b"\r\n")
    template = request_line + b"\r\nX-Request-ID: {id}\r\n" + fields + b"\r\n"
    refuse(edge, upstream, refused_probes, template, 400, "bad_request")


# -- targets -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_line", "judged_by_read_head"),
    [
        pytest.param(b"GET * HTTP/1.1", True, id="GET-asterisk"),
        pytest.param(b"POST * HTTP/1.1", True, id="POST-asterisk"),
        pytest.param(b"OPTIONS *?x HTTP/1.1", True, id="asterisk-with-query"),
        pytest.param(b"GET {path}#fragment HTTP/1.1", True, id="fragment"),
        pytest.param(b"GET {path}?q=1#f HTTP/1.1", True, id="fragment-after-query"),
        pytest.param(b"GET {path}# HTTP/1.1", True, id="empty-fragment"),
        # Refused by the parser inside the request line, before any field (the client's id
        # among them) is read: the refusal gets an id of the edge's.
        pytest.param("GET {path}/caf\u00e9 HTTP/1.1".encode(), False, id="non-ascii-utf8"),
        pytest.param(b"GET {path}/\xff HTTP/1.1", False, id="non-ascii-byte"),
        pytest.param(b"GET {path}/\x7f HTTP/1.1", False, id="DEL"),
        pytest.param(b"GET rh/relative HTTP/1.1", False, id="relative"),
    ],
)
def test_bad_target_is_400(
    edge: RunningEdge,
    upstream: UpstreamApp,
    refused_probes: list[Probe],
    request_line: bytes,
    judged_by_read_head: bool,
) -> None:
    probe = Probe()
    request = probe.render(request_line + b"\r\nX-Request-ID: {id}\r\nHost: a\r\n\r\n")
    echoed = probe.request_id if judged_by_read_head else None
    assert_refused(edge, upstream, refused_probes, request, 400, "bad_request", probe=probe, echoed_id=echoed)


def test_options_asterisk_is_answered_by_the_edge(edge: RunningEdge, upstream: UpstreamApp) -> None:
    probe = Probe()
    # Pipelined behind it, a request that must still be forwarded: OPTIONS * refused nothing.
    request = probe.render(
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\nX-Request-ID: {id}\r\n\r\n"
        b"GET {path}/after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    exchange = raw_exchange(edge.port, request, timeout=3.0)
    response = exchange.response
    assert response.status_line == b"HTTP/1.1 204 No Content", exchange.data
    allow = response.values("allow")
    assert len(allow) == 1
    assert {method.strip() for method in allow[0].decode().split(",")} == ALLOWED_METHODS
    assert response.values("content-length") in ([], [b"0"])
    assert response.values("x-request-id") == [probe.request_id.encode()]
    # A 204 has no body: what follows its head is the answer to the pipelined request.
    assert response.body.startswith(b"HTTP/1.1 200 OK\r\n"), exchange.data
    records = forwarded(upstream, probe)
    assert [record.raw_path for record in records] == [probe.path.encode() + b"/after"]
    assert records[0].method == "GET"


def test_options_asterisk_in_http_1_0_is_answered_by_the_edge(edge: RunningEdge, upstream: UpstreamApp) -> None:
    probe = Probe()
    exchange = raw_exchange(edge.port, probe.render(b"OPTIONS * HTTP/1.0\r\nX-Request-ID: {id}\r\n\r\n"))
    response = exchange.response
    assert response.status == 204, exchange.data
    assert response.values("allow")
    time.sleep(SETTLE)
    assert forwarded(upstream, probe) == []


# -- body framing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(b"Transfer-Encoding: gzip, chunked\r\n", id="gzip,chunked"),
        pytest.param(b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", id="gzip+chunked-fields"),
        pytest.param(b"Transfer-Encoding: identity, chunked\r\n", id="identity,chunked"),
        pytest.param(b"Transfer-Encoding: GZIP, Chunked\r\n", id="upper-case"),
    ],
)
def test_transfer_coding_other_than_chunked_alone_is_501(
    edge: RunningEdge, upstream: UpstreamApp, refused_probes: list[Probe], fields: bytes
) -> None:
    template = b"POST {path} HTTP/1.1\r\nX-Request-ID: {id}\r\nHost: a\r\n" + fields + b"\r\n5\r\nhello\r\n0\r\n\r\n"
    refuse(edge, upstream, refused_probes, template, 501, "not_implemented")


@pytest.mark.parametrize(
    ("version", "fields", "body"),
    [
        pytest.param(b"1.1", b"Transfer-Encoding: chunked, gzip\r\n", b"5\r\nhello\r\n0\r\n\r\n", id="chunked,gzip"),
        pytest.param(
            b"1.1", b"Transfer-Encoding: chunked, chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n", id="chunked,chunked"
        ),
        pytest.param(
            b"1.1",
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            b"5\r\nhello\r\n0\r\n\r\n",
            id="chunked+chunked-fields",
        ),
        pytest.param(
            b"1.1",
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n",
            b"5\r\nhello\r\n0\r\n\r\n",
            id="chunked+gzip-fields",
        ),
        pytest.param(b"1.1", b"Transfer-Encoding: gzip\r\n", b"hello", id="gzip-alone"),
        pytest.param(b"1.0", b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n", id="chunked-in-1.0"),
        pytest.param(
            b"1.1",
            b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            b"0\r\n\r\nGET {path}/smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
            id="CL+TE",
        ),
        pytest.param(
            b"1.1",
            b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            b"5\r\nhello\r\n0\r\n\r\n",
            id="TE+CL",
        ),
        pytest.param(b"1.1", b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello", id="two-equal-CL"),
        pytest.param(b"1.1", b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!", id="two-different-CL"),
        pytest.param(b"1.1", b"Content-Length: +5\r\n", b"hello", id="CL-plus-sign"),
        pytest.param(b"1.1", b"Content-Length: 5, 5\r\n", b"hello", id="CL-list"),
        pytest.param(b"1.1", b"Content-Length: -5\r\n", b"hello", id="CL-negative"),
        pytest.param(b"1.1", b"Content-Length: 0x5\r\n", b"hello", id="CL-hex"),
        pytest.param(b"1.1", b"Content-Length: \r\n", b"hello", id="CL-empty"),
        pytest.param(b"1.1", b"Content-Length: 99999999999999999999999\r\n", b"hello", id="CL-overflow"),
    ],
)
def test_ambiguous_body_framing_is_400(
    edge: RunningEdge,
    upstream: UpstreamApp,
    refused_probes: list[Probe],
    version: bytes,
    fields: bytes,
    body: bytes,
) -> None:
    template = b"POST {path} HTTP/" + version + b"\r\nX-Request-ID: {id}\r\nHost: a\r\n" + fields + b"\r\n" + body
    refuse(edge, upstream, refused_probes, template, 400, "bad_request")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"zz\r\nhello\r\n0\r\n\r\n", id="non-hex-size"),
        pytest.param(b"0x5\r\nhello\r\n0\r\n\r\n", id="0x-size"),
        pytest.param(b"-5\r\nhello\r\n0\r\n\r\n", id="negative-size"),
        pytest.param(b"5\r\nhelloXX0\r\n\r\n", id="data-without-crlf"),
        pytest.param(b"5\r\nhello\r\n0\r\n\rX", id="last-chunk-without-final-crlf"),
        pytest.param(b"5\nhello\n0\n\n", id="bare-lf"),
        pytest.param(b"fffffffffffffffffff\r\nhello\r\n0\r\n\r\n", id="size-overflow"),
        pytest.param(b"5\r\nhello\r\n0\r\nX-Trailer: a\x01b\r\n\r\n", id="control-character-in-trailer"),
    ],
)
def test_bad_chunk_syntax_is_400(
    edge: RunningEdge, upstream: UpstreamApp, refused_probes: list[Probe], body: bytes
) -> None:
    template = b"POST {path} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nX-Request-ID: {id}\r\n\r\n" + body
    refuse(edge, upstream, refused_probes, template, 400, "bad_request")


# -- header bytes the parser rejects --------------------------------------------------------------------------


# The client's `X-Request-ID` comes back when the parser read that field before the error;
# an error in the request line comes before any field.
HEADER_BYTE_ERRORS = {
    "obs-fold": b"X-A: b\r\n folded\r\n\r\n",
    "obs-fold-into-host": b"X-B: c\r\n Host: b\r\n\r\n",
    "space-before-colon": b"X-A : b\r\n\r\n",
    "space-before-colon-in-host": b"Host : b\r\n\r\n",
    "tab-before-colon": b"X-A\t: b\r\n\r\n",
    "bare-lf-after-a-field": b"X-A: b\nX-B: c\r\n\r\n",
    "bare-lf-ending-the-head": b"X-A: b\r\n\n",
    "bare-cr": b"X-A: b\rc\r\n\r\n",
    "NUL-in-value": b"X-A: b\x00c\r\n\r\n",
    "SOH-in-value": b"X-A: b\x01c\r\n\r\n",
    "DEL-in-value": b"X-A: b\x7fc\r\n\r\n",
    "NUL-in-name": b"X\x00A: b\r\n\r\n",
    "space-in-name": b"X A: b\r\n\r\n",
    "empty-name": b": b\r\n\r\n",
    "no-colon": b"no-colon\r\n\r\n",
}
REQUEST_LINE_ERRORS = {
    "lower-case-method": b"get {path} HTTP/1.1\r\n",
    "unknown-method": b"FETCH {path} HTTP/1.1\r\n",
    "tab-in-request-line": b"GET\t{path} HTTP/1.1\r\n",
    "bare-lf-request-line": b"GET {path} HTTP/1.1\n",
    "lower-case-protocol": b"GET {path} http/1.1\r\n",
    "no-target": b"GET HTTP/1.1\r\n",
}


@pytest.mark.parametrize("fields", list(HEADER_BYTE_ERRORS.values()), ids=list(HEADER_BYTE_ERRORS))
def test_header_bytes_the_parser_rejects_are_400(
    edge: RunningEdge, upstream: UpstreamApp, refused_probes: list[Probe], fields: bytes
) -> None:
    # The client's id is read before the broken field, so the refusal carries it. (With no
    # field between them it does not: httptools hands a field over only once the next one's
    # name is complete, and the refusal then gets an id of the edge's.)
    template = b"GET {path} HTTP/1.1\r\nX-Request-ID: {id}\r\nHost: a\r\n" + fields
    refuse(edge, upstream, refused_probes, template, 400, "bad_request")


@pytest.mark.parametrize("request_line", list(REQUEST_LINE_ERRORS.values()), ids=list(REQUEST_LINE_ERRORS))
def test_request_line_the_parser_rejects_is_400(
    edge: RunningEdge, upstream: UpstreamApp, refused_probes: list[Probe], request_line: bytes
) -> None:
    probe = Probe()
    request = probe.render(request_line + b"Host: a\r\nX-Request-ID: {id}\r\n\r\n")
    assert_refused(edge, upstream, refused_probes, request, 400, "bad_request", probe=probe, echoed_id=None)


def test_invalid_client_request_id_is_not_echoed(
    edge: RunningEdge, upstream: UpstreamApp, refused_probes: list[Probe]
) -> None:
    probe = Probe()
    request = probe.render(b"GET {path} HTTP/2.0\r\nHost: a\r\nX-Request-ID: {id} with spaces\r\n\r\n")
    assert_refused(
        edge,
        upstream,
        refused_probes,
        request,
        505,
        "http_version_not_supported",
        probe=probe,
        echoed_id=None,
    )


def test_head_that_never_ends_is_431(edge: RunningEdge, upstream: UpstreamApp, refused_probes: list[Probe]) -> None:
    probe = Probe()
    refused_probes.append(probe)
    limit = edge.settings.max_header_bytes + 512 * 1024
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5.0) as sock:
        sock.sendall(probe.render(b"GET {path} HTTP/1.1\r\nHost: a\r\nX-Request-ID: {id}\r\nX-Endless: "))
        # A head that never ends: without a bound the edge would keep waiting for its end,
        # and keep everything sent so far in memory.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"a" * (limit + 65536))
        data, _ = read_until_closed(sock)
    response = WireResponse.unframed(data)
    assert_raw_envelope(response, 431, "headers_too_large")
    assert response.json()["error"]["message"] == f"The request headers are larger than {limit:,} bytes."
    assert response.values("connection") == [b"close"]
    assert response.values("x-request-id") == [probe.request_id.encode()]
    for name, value in expected_security_headers(edge).items():
        assert response.values(name.decode()) == [value], name
    time.sleep(SETTLE)
    assert forwarded(upstream, probe) == []


def test_large_body_right_behind_a_small_head_is_not_mistaken_for_a_large_head(
    edge: RunningEdge, upstream: UpstreamApp
) -> None:
    # The bound counts whole reads while the head is incomplete, body bytes in them too.
    body = b"x" * (3 * 1024 * 1024)
    probe = Probe()
    head = probe.render(b"POST {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n")
    exchange = raw_exchange(edge.port, head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    response = exchange.response
    assert response.status == 200, exchange.data[:300]
    (record,) = forwarded(upstream, probe)
    assert record.body_length == len(body)


def test_refusal_of_a_pipelined_request_comes_after_the_answer_to_the_one_before(
    edge: RunningEdge, upstream: UpstreamApp, refused_probes: list[Probe]
) -> None:
    first, second = Probe(), Probe()
    refused_probes.append(second)
    request = first.render(b"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n") + second.render(
        b"GET {path} HTTP/1.1\r\nHost: a\r\nHost: b\r\nX-Request-ID: {id}\r\n\r\n"
    )
    exchange = raw_exchange(edge.port, request, timeout=3.0)
    response = exchange.response
    assert response.status == 200, exchange.data
    assert exchange.closed
    length = int(response.values("content-length")[0])
    refusal = WireResponse.unframed(response.body[length:])
    assert_raw_envelope(refusal, 400, "bad_request")
    assert refusal.values("x-request-id") == [second.request_id.encode()]
    assert refusal.values("connection") == [b"close"]
    time.sleep(SETTLE)
    assert len(forwarded(upstream, first)) == 1
    assert forwarded(upstream, second) == []


# -- what is forwarded, and how ---------------------------------------------------------------------------------


def test_trailers_are_dropped_never_promoted_to_headers(edge: RunningEdge, upstream: UpstreamApp) -> None:
    body = (
        b"5\r\nhello\r\n0\r\n"
        b"Host: evil.example\r\nAuthorization: Bearer stolen\r\nX-Trailer: t\r\nX-Request-ID: trailer-id\r\n\r\n"
    )
    template = b"POST {path} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTrailer: X-Trailer\r\n"
    _, record = forward_one(edge, upstream, template + b"Connection: close\r\n\r\n" + body)
    assert record.header(b"host") == [b"a"]
    assert record.header(b"authorization") == []
    assert record.header(b"x-trailer") == []
    assert record.header(b"trailer") == []
    assert record.header(b"content-length") == [b"5"]
    assert record.body_length == 5
    assert record.body_sha256 == hashlib.sha256(b"hello").hexdigest()
    assert record.header(b"x-request-id") != [b"trailer-id"]


@pytest.mark.parametrize(
    "trailer",
    [
        pytest.param(b"Content-Length: 999\r\n", id="content-length"),
        pytest.param(b"Transfer-Encoding: chunked\r\n", id="transfer-encoding"),
        pytest.param(b"X-A : b\r\n", id="space-before-colon"),
        pytest.param(b"X-A: b\r\n folded\r\n", id="obs-fold"),
    ],
)
def test_framing_fields_or_bad_bytes_in_trailers_are_400(
    edge: RunningEdge, upstream: UpstreamApp, refused_probes: list[Probe], trailer: bytes
) -> None:
    template = b"POST {path} HTTP/1.1\r\nX-Request-ID: {id}\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    refuse(edge, upstream, refused_probes, template + b"5\r\nhello\r\n0\r\n" + trailer + b"\r\n", 400, "bad_request")


def test_h2c_upgrade_is_forwarded_as_a_plain_get(edge: RunningEdge, upstream: UpstreamApp) -> None:
    template = (
        b"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nX-Kept: yes\r\n\r\n"
        b"GET {path}/next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    probe = Probe()
    exchange = raw_exchange(edge.port, probe.render(template), timeout=3.0)
    response = exchange.response
    assert response.status == 200, exchange.data  # not 101: the upgrade is ignored
    assert b"HTTP/1.1 101" not in exchange.data
    records = forwarded(upstream, probe)
    assert [r.raw_path for r in records] == [probe.path.encode(), probe.path.encode() + b"/next"]
    first = records[0]
    assert first.method == "GET"
    assert first.header(b"upgrade") == []
    assert first.header(b"http2-settings") == []
    assert first.header(b"connection") == []
    assert first.header(b"x-kept") == [b"yes"]
    assert first.body_length == 0


def test_h2c_upgrade_with_a_body_forwards_the_body_not_a_second_request(
    edge: RunningEdge, upstream: UpstreamApp
) -> None:
    probe = Probe()
    smuggled = probe.render(b"GET {path}/smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
    head = b"POST {path} HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: %d\r\n\r\n"
    request = (
        probe.render(head % len(smuggled))
        + smuggled
        + probe.render(b"GET {path}/next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    )
    exchange = raw_exchange(edge.port, request, timeout=3.0)
    response = exchange.response
    assert response.status == 200, exchange.data
    records = forwarded(upstream, probe)
    assert [r.raw_path for r in records] == [probe.path.encode(), probe.path.encode() + b"/next"]
    assert records[0].method == "POST"
    assert records[0].body_sha256 == hashlib.sha256(smuggled).hexdigest()
    assert records[0].header(b"upgrade") == []


def test_valid_chunked_request_is_forwarded_with_its_exact_body(edge: RunningEdge, upstream: UpstreamApp) -> None:
    parts = [b"hello ", bytes(range(256)), b"\r\n0\r\n\r\n", b"x" * 4000]
    body = b"".join(b"%X;ext=%d\r\n%b\r\n" % (len(part), number, part) for number, part in enumerate(parts))
    template = (
        b"PUT {path}?chunked=yes HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n"
        + body
        + b"0\r\n\r\n"
    )
    expected = b"".join(parts)
    _, record = forward_one(edge, upstream, template)
    assert record.method == "PUT"
    assert record.query_string == b"chunked=yes"
    assert record.header(b"transfer-encoding") == []
    assert record.header(b"content-length") == [str(len(expected)).encode()]
    assert record.body_length == len(expected)
    assert record.body_sha256 == hashlib.sha256(expected).hexdigest()


def test_content_length_request_is_forwarded_with_its_exact_body(edge: RunningEdge, upstream: UpstreamApp) -> None:
    probe = Probe()
    body = probe.render(b"GET {path}/smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
    head = b"POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    exchange = raw_exchange(edge.port, probe.render(head) + body, timeout=3.0)
    response = exchange.response
    assert response.status == 200, exchange.data
    records = forwarded(upstream, probe)
    assert [r.raw_path for r in records] == [probe.path.encode()]
    assert records[0].header(b"content-length") == [str(len(body)).encode()]
    assert records[0].body_sha256 == hashlib.sha256(body).hexdigest()
