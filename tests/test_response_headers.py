"""What the edge adds to responses: security headers, request ids, the cache policy, and the
outer layers' headers on the responses the edge makes itself.

The upstream is an `UpstreamApp`, the shared one or the module's own, told through the
query string to serve HTML, set its own headers or fail; every exchange crosses loopback.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from edge.policy import Policy, RouteRule
from tests.concerns_support import (
    ALWAYS_EXPOSED,
    API_CSP,
    APP_ORIGIN,
    EVIL_ORIGIN,
    assert_api_security_headers,
    assert_common_security_headers,
    assert_envelope,
    csp_directives,
    header_pairs,
    is_uuid7,
    now_millis,
    request_head,
    tokens,
    unique_path,
    uuid7_millis,
)
from tests.servers import RawUpstream, RunningEdge, ServerThread, UpstreamApp, closed_port, running_edge
from tests.wire import WireClient

IMMUTABLE = "public, max-age=31536000, immutable"
SHARED = "public, max-age=600"
BODY_LIMIT = 1000
HEADER_COUNT_LIMIT = 20


@pytest.fixture(scope="module")
def scripted_edge(scripted: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    """Development, one allowed origin, `/media/**` and `/shared/**` cache rules, small size limits."""
    policy = Policy(routes=[RouteRule(path="/media/**", cache="immutable"), RouteRule(path="/shared/**", cache=SHARED)])
    with running_edge(
        scripted[0].url,
        policy,
        cors_allow_origins=[APP_ORIGIN],
        max_body_bytes=BODY_LIMIT,
        max_header_count=HEADER_COUNT_LIMIT,
    ) as edge:
        yield edge


@pytest.fixture(scope="module")
def production_edge(scripted: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    with running_edge(scripted[0].url, environment="production") as edge:
        yield edge


@pytest.fixture(scope="module")
def custom_csp_edge(scripted: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    with running_edge(scripted[0].url, content_security_policy="default-src 'self'") as edge:
        yield edge


def fetch(
    edge: RunningEdge,
    path: str,
    *,
    query: list[tuple[str, str]] | None = None,
    headers: list[tuple[str, str]] | list[tuple[bytes, bytes]] | None = None,
    method: str = "GET",
) -> httpx.Response:
    return httpx.request(method, edge.url + path, params=tuple(query or ()), headers=headers, timeout=5)


def only(response: httpx.Response, name: str) -> str:
    values = response.headers.get_list(name)
    assert len(values) == 1, f"{name}: expected exactly one, got {values}"
    return values[0]


def html_csp(edge: RunningEdge) -> dict[str, list[str]]:
    response = fetch(edge, "/page", query=[("type", "html")])
    assert response.status_code == 200
    assert_common_security_headers(header_pairs(response))
    return csp_directives(only(response, "content-security-policy"))


# -- security headers -------------------------------------------------------------------------------


def test_api_response_carries_the_api_preset(edge: RunningEdge) -> None:
    response = fetch(edge, "/echo")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert_api_security_headers(header_pairs(response))


def test_html_response_carries_the_html_preset(scripted_edge: RunningEdge) -> None:
    csp = html_csp(scripted_edge)
    assert {"'self'", "blob:"} <= set(csp["media-src"])
    assert csp["script-src"] == ["'self'"]
    assert "'unsafe-inline'" not in csp["script-src"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert "upgrade-insecure-requests" not in csp, "development pages on http://localhost would break"


def test_html_csp_upgrades_insecure_requests_in_production(production_edge: RunningEdge) -> None:
    csp = html_csp(production_edge)
    assert "upgrade-insecure-requests" in csp
    assert csp["script-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"]


def test_configured_csp_replaces_the_html_csp_only(custom_csp_edge: RunningEdge) -> None:
    page = fetch(custom_csp_edge, "/page", query=[("type", "html")])
    assert page.headers.get_list("content-security-policy") == ["default-src 'self'"]
    api = fetch(custom_csp_edge, "/api/thing")
    assert api.headers.get_list("content-security-policy") == [API_CSP]


def test_not_modified_gets_no_preset_so_the_kept_pages_csp_stays(scripted_edge: RunningEdge) -> None:
    """A browser merges a 304's headers into the page it kept: the API preset's
    `default-src 'none'` on a 304 of a page would block its scripts on every reload."""
    response = fetch(
        scripted_edge, "/page", query=[("status", "304"), ("header", "Server: upstream/1.0"), ("header", 'ETag: "v1"')]
    )
    assert response.status_code == 304
    assert response.headers["etag"] == '"v1"'
    for name in ("content-security-policy", "x-frame-options", "referrer-policy", "server"):
        assert name not in response.headers, name


def test_upstream_server_header_is_removed(edge: RunningEdge) -> None:
    response = fetch(edge, "/hop-by-hop")
    assert response.status_code == 200
    assert response.headers.get("x-kept") == "yes", "the upstream's own headers should pass"
    assert "server" not in response.headers


def test_upstream_server_and_x_powered_by_are_removed(scripted_edge: RunningEdge) -> None:
    query = [("header", "Server: gunicorn/22.0"), ("header", "X-Powered-By: Express"), ("header", "X-App: 1")]
    response = fetch(scripted_edge, "/page", query=query)
    assert response.status_code == 200
    assert response.headers.get("x-app") == "1"
    assert "server" not in response.headers
    assert "x-powered-by" not in response.headers


@pytest.mark.parametrize(
    ("name", "value", "content_type"),
    [
        ("Referrer-Policy", "same-origin", "json"),
        ("X-Frame-Options", "SAMEORIGIN", "html"),
        ("Content-Security-Policy", "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'", "html"),
        ("Strict-Transport-Security", "max-age=31536000", "json"),
    ],
)
def test_a_security_header_the_upstream_set_is_kept_not_duplicated(
    scripted_edge: RunningEdge, name: str, value: str, content_type: str
) -> None:
    response = fetch(scripted_edge, "/page", query=[("type", content_type), ("header", f"{name}: {value}")])
    assert response.headers.get_list(name) == [value]
    # The others are still added.
    assert_common_security_headers(header_pairs(response), besides=name.lower())


# -- edge-made responses ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dead_edge() -> Iterator[RunningEdge]:
    with running_edge(f"http://127.0.0.1:{closed_port()}", cors_allow_origins=[APP_ORIGIN]) as edge:
        yield edge


@pytest.fixture(scope="module")
def hanging_edge(raw_upstream: RawUpstream) -> Iterator[RunningEdge]:
    with running_edge(raw_upstream.url, cors_allow_origins=[APP_ORIGIN], upstream_read_timeout=0.5) as edge:
        yield edge


Answer = tuple[int, list[tuple[str, str]], bytes]


def answer(response: httpx.Response) -> Answer:
    return response.status_code, header_pairs(response), response.content


def raw_answer(edge: RunningEdge, head: bytes) -> Answer:
    with WireClient(edge.port) as connection:
        connection.send(head)
        response = connection.read_response()
    return response.status, header_pairs(response), response.body


def bad_gateway(request: pytest.FixtureRequest, origin: list[tuple[str, str]]) -> Answer:
    edge: RunningEdge = request.getfixturevalue("dead_edge")
    return answer(fetch(edge, "/api/anything", headers=origin))


def gateway_timeout(request: pytest.FixtureRequest, origin: list[tuple[str, str]]) -> Answer:
    edge: RunningEdge = request.getfixturevalue("hanging_edge")
    return answer(fetch(edge, "/hang", headers=origin))


def edge_not_found(request: pytest.FixtureRequest, origin: list[tuple[str, str]]) -> Answer:
    edge: RunningEdge = request.getfixturevalue("scripted_edge")
    return answer(fetch(edge, "/_edge/nope", headers=origin))


def refused_preflight(request: pytest.FixtureRequest, origin: list[tuple[str, str]]) -> Answer:
    edge: RunningEdge = request.getfixturevalue("scripted_edge")
    asked = [("Access-Control-Request-Method", "PROPFIND")]
    return answer(fetch(edge, "/api/thing", method="OPTIONS", headers=[*origin, *asked]))


def payload_too_large(request: pytest.FixtureRequest, origin: list[tuple[str, str]]) -> Answer:
    edge: RunningEdge = request.getfixturevalue("scripted_edge")
    return raw_answer(edge, request_head("POST", "/api/thing", [*origin, ("Content-Length", "1001")]))


def headers_too_large(request: pytest.FixtureRequest, origin: list[tuple[str, str]]) -> Answer:
    edge: RunningEdge = request.getfixturevalue("scripted_edge")
    many = [(f"X-Filler-{number}", "x") for number in range(HEADER_COUNT_LIMIT + 5)]
    return answer(fetch(edge, "/api/thing", headers=[*origin, *many]))


EDGE_MADE: list[tuple[Callable[[pytest.FixtureRequest, list[tuple[str, str]]], Answer], int, str]] = [
    (bad_gateway, 502, "upstream_unavailable"),
    (gateway_timeout, 504, "upstream_timeout"),
    (edge_not_found, 404, "not_found"),
    (refused_preflight, 403, "cors_forbidden"),
    (payload_too_large, 413, "payload_too_large"),
    (headers_too_large, 431, "headers_too_large"),
]
ORIGINS = {"allowed-origin": APP_ORIGIN, "disallowed-origin": EVIL_ORIGIN, "no-origin": None}


@pytest.mark.parametrize(
    ("make", "status", "code", "origin"),
    [
        pytest.param(make, status, code, origin, id=f"{status}-{label}")
        for make, status, code in EDGE_MADE
        for label, origin in ORIGINS.items()
        if origin is not None or status != 403  # without an Origin, OPTIONS is no preflight
    ],
)
def test_edge_made_response_carries_the_outer_layers_headers(
    request: pytest.FixtureRequest,
    make: Callable[[pytest.FixtureRequest, list[tuple[str, str]]], Answer],
    status: int,
    code: str,
    origin: str | None,
) -> None:
    got_status, headers, body = make(request, [("Origin", origin)] if origin else [])
    assert got_status == status, body
    assert_envelope(got_status, headers, body, code)  # includes: body request_id == X-Request-ID
    assert is_uuid7(next(value for key, value in headers if key == "x-request-id"))
    assert_api_security_headers(headers)
    assert "origin" in tokens([value for key, value in headers if key == "vary"])
    allow_origin = [value for key, value in headers if key == "access-control-allow-origin"]
    if origin == APP_ORIGIN and status != 403:
        # A refused preflight is CORS's own answer; every other one passed through CORS.
        assert allow_origin == [APP_ORIGIN]
        exposed = tokens([value for key, value in headers if key == "access-control-expose-headers"])
        assert exposed >= ALWAYS_EXPOSED
    elif origin != APP_ORIGIN:
        assert allow_origin == []


# -- request ids ------------------------------------------------------------------------------------


def upstream_request_ids(response: httpx.Response) -> list[str]:
    """The `X-Request-ID` values the scripted upstream saw, from its echoed JSON."""
    assert response.status_code == 200, response.text
    seen: dict[str, Any] = response.json()
    return [value for name, value in seen["headers"] if name == "x-request-id"]


@pytest.mark.parametrize(
    "incoming",
    ["abc", "A" * 128, "0190f1e2-7d3c-7a4b-9c1d-2e3f4a5b6c7d", "req_1.2-3", "..--__"],
    ids=["short", "128-chars", "uuid", "mixed", "punctuation-only"],
)
def test_valid_incoming_request_id_is_echoed_and_forwarded_unchanged(scripted_edge: RunningEdge, incoming: str) -> None:
    response = fetch(scripted_edge, "/echo", headers=[("X-Request-ID", incoming)])
    assert response.headers.get_list("x-request-id") == [incoming]
    assert upstream_request_ids(response) == [incoming]


@pytest.mark.parametrize(
    "incoming",
    [
        [b"A" * 129],
        [b"has space"],
        [b"semi;colon"],
        ["ünïcode".encode()],
        [b'quote"d'],
        [b""],
        [b"first", b"second"],
        [b"same", b"same"],
    ],
    ids=["129-chars", "space", "semicolon", "unicode", "quote", "empty", "two-copies", "two-equal-copies"],
)
def test_invalid_incoming_request_id_is_replaced_by_a_uuid7(scripted_edge: RunningEdge, incoming: list[bytes]) -> None:
    response = fetch(scripted_edge, "/echo", headers=[(b"X-Request-ID", value) for value in incoming])
    echoed = response.headers.get_list("x-request-id")
    assert len(echoed) == 1
    assert is_uuid7(echoed[0]), echoed
    assert upstream_request_ids(response) == echoed


def test_request_id_with_a_carriage_return_never_survives(
    scripted_edge: RunningEdge, scripted: tuple[ServerThread, UpstreamApp]
) -> None:
    # A bare CR inside a field value may be refused outright (RFC 9110 section 5.5); either
    # way the id is the edge's own and the injected value reaches nobody.
    marker = unique_path("").strip("/")
    path = unique_path()
    head = f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Request-ID: {marker}\rinjected\r\nConnection: close\r\n\r\n"
    with WireClient(scripted_edge.port) as connection:
        connection.send(head.encode())
        response = connection.read_response()
    assert response.status in (200, 400)
    echoed = [value.decode() for value in response.values("x-request-id")]
    assert len(echoed) == 1
    assert is_uuid7(echoed[0]), echoed
    for seen in scripted[1].record.requests:
        assert not any(marker.encode() in value for _, value in seen.headers), "the injected id was forwarded"
    if response.status == 200:
        assert response.json()["path"] == path
        assert [value for name, value in response.json()["headers"] if name == "x-request-id"] == echoed
    else:
        assert not scripted[1].record.saw_path(path)
        assert_envelope(400, header_pairs(response), response.body, "bad_request")


def test_request_id_is_generated_when_absent(scripted_edge: RunningEdge) -> None:
    before = now_millis()
    response = fetch(scripted_edge, "/echo")
    after = now_millis()
    echoed = response.headers.get_list("x-request-id")
    assert len(echoed) == 1
    assert is_uuid7(echoed[0])
    assert before <= uuid7_millis(echoed[0]) <= after, "a UUIDv7 starts with the time it was made"
    assert upstream_request_ids(response) == echoed


def test_generated_request_ids_are_time_ordered_and_distinct(scripted_edge: RunningEdge) -> None:
    ids = []
    with httpx.Client(base_url=scripted_edge.url, timeout=5) as client:
        for _ in range(8):
            ids.append(client.get("/echo").headers["x-request-id"])
            time.sleep(0.002)  # ids made in one millisecond need not be ordered among themselves
    assert all(is_uuid7(value) for value in ids)
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids), "consecutive ids should sort in the order they were made"
    stamps = [uuid7_millis(value) for value in ids]
    assert stamps == sorted(stamps)
    assert stamps[0] < stamps[-1]


def test_upstreams_own_request_id_header_does_not_create_a_duplicate(scripted_edge: RunningEdge) -> None:
    response = fetch(
        scripted_edge,
        "/echo",
        query=[("header", "X-Request-ID: chosen-by-the-upstream")],
        headers=[("X-Request-ID", "sent-by-the-client")],
    )
    assert response.headers.get_list("x-request-id") == ["sent-by-the-client"]
    assert upstream_request_ids(response) == ["sent-by-the-client"]


# -- cache policy -----------------------------------------------------------------------------------


def cache_control(edge: RunningEdge, path: str, *query: tuple[str, str]) -> list[str]:
    response = fetch(edge, path, query=list(query))
    return response.headers.get_list("cache-control")


def test_api_response_without_cache_control_is_no_store(scripted_edge: RunningEdge) -> None:
    assert cache_control(scripted_edge, "/api/v1/sessions") == ["no-store"]


@pytest.mark.parametrize("path", ["/assets/app.3f9a1c2e.js", "/static/index-B4x9Kq2z.css"])
def test_fingerprinted_asset_is_immutable(scripted_edge: RunningEdge, path: str) -> None:
    assert cache_control(scripted_edge, path, ("type", "js")) == [IMMUTABLE]


def test_name_without_a_hash_gets_no_cache_control(scripted_edge: RunningEdge) -> None:
    assert cache_control(scripted_edge, "/js/bootstrap-datepicker.js", ("type", "js")) == []


def test_html_page_is_revalidated(scripted_edge: RunningEdge) -> None:
    assert cache_control(scripted_edge, "/voice", ("type", "html")) == ["no-cache"]


@pytest.mark.parametrize("status", ["404", "500"])
def test_failure_on_a_fingerprinted_path_is_never_cached(scripted_edge: RunningEdge, status: str) -> None:
    assert cache_control(scripted_edge, "/assets/app.3f9a1c2e.js", ("status", status)) == ["no-store"]


@pytest.mark.parametrize("status", ["302", "307"])
def test_temporary_redirect_on_a_fingerprinted_path_is_not_pinned_for_a_year(
    scripted_edge: RunningEdge, status: str
) -> None:
    # Only the asset itself (a 200) carries the hash's promise; a temporary redirect (say,
    # to a signed storage URL) made immutable would be followed from caches for a year.
    query = [("status", status), ("header", "Location: https://storage.example.com/app.js?sig=1")]
    response = fetch(scripted_edge, "/assets/app.3f9a1c2e.js", query=query)
    assert response.status_code == int(status)
    assert IMMUTABLE not in response.headers.get_list("cache-control")


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/api/v1/sessions", "json"),
        ("/assets/app.3f9a1c2e.js", "js"),
        ("/voice", "html"),
        ("/media/voice/clip.ogg", "json"),
    ],
)
def test_upstreams_own_cache_control_is_kept_untouched(
    scripted_edge: RunningEdge, path: str, content_type: str
) -> None:
    own = "private, max-age=60"
    got = cache_control(scripted_edge, path, ("type", content_type), ("header", f"Cache-Control: {own}"))
    assert got == [own]


def test_policy_cache_rule_applies_to_its_paths_only(scripted_edge: RunningEdge) -> None:
    assert cache_control(scripted_edge, "/media/voice/clip.ogg") == [IMMUTABLE]
    assert cache_control(scripted_edge, "/media/notes") == [IMMUTABLE]
    assert cache_control(scripted_edge, "/mediafiles/clip") == []


@pytest.mark.parametrize("status", ["404", "500", "503"])
@pytest.mark.parametrize(("path", "rule"), [("/shared/notes.txt", SHARED), ("/media/clip.ogg", IMMUTABLE)])
def test_failure_on_a_path_with_a_cache_rule_is_never_cached(
    scripted_edge: RunningEdge, path: str, rule: str, status: str
) -> None:
    # Errors come before rules (docs/edge.md#cache-policy): a rule says how to cache what
    # the path serves when it works, not a passing failure.
    assert cache_control(scripted_edge, path) == [rule]
    assert cache_control(scripted_edge, path, ("status", status)) == ["no-store"]
