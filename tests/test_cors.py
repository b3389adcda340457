"""CORS at the edge: the origin allow-list, preflights answered (and refused) at the edge,
`Vary: Origin`, credentials, the start-up refusals, and WebSocket origin checks.

Every request crosses loopback to a real edge, and from it to a real upstream whose record
tells whether a request was forwarded.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from pydantic import ValidationError
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from edge.settings import EdgeSettings
from tests.concerns_support import (
    ALWAYS_EXPOSED,
    APP_ORIGIN,
    EVIL_ORIGIN,
    assert_envelope,
    header_pairs,
    tokens,
    unique_path,
)
from tests.servers import RunningEdge, ServerThread, UpstreamApp, running_edge

MAX_AGE = 1234


def get(edge: RunningEdge, path: str, origin: str | None = None, method: str = "GET") -> httpx.Response:
    headers = {"Origin": origin} if origin is not None else {}
    return httpx.request(method, edge.url + path, headers=headers, timeout=5)


def preflight(
    edge: RunningEdge, path: str, origin: str, method: str, request_headers: str | None = None
) -> httpx.Response:
    headers = {"Origin": origin, "Access-Control-Request-Method": method}
    if request_headers is not None:
        headers["Access-Control-Request-Headers"] = request_headers
    return httpx.request("OPTIONS", edge.url + path, headers=headers, timeout=5)


def vary(response: httpx.Response) -> set[str]:
    return tokens(response.headers.get_list("vary"))


def forwarded(upstream: UpstreamApp, path: str) -> bool:
    return path.encode() in upstream.record.paths()


# -- edges ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exact_edge(upstream_server: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    with running_edge(upstream_server[0].url, cors_allow_origins=[APP_ORIGIN], cors_max_age=MAX_AGE) as edge:
        yield edge


@pytest.fixture(scope="module")
def wildcard_edge(upstream_server: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    with running_edge(upstream_server[0].url, cors_allow_origins=["https://*.example.com"]) as edge:
        yield edge


@pytest.fixture(scope="module")
def credentials_edge(upstream_server: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    with running_edge(upstream_server[0].url, cors_allow_origins=[APP_ORIGIN], cors_allow_credentials=True) as edge:
        yield edge


@pytest.fixture(scope="module")
def any_origin_edge(upstream_server: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    with running_edge(upstream_server[0].url, cors_allow_origins=["*"]) as edge:
        yield edge


# -- simple requests --------------------------------------------------------------------------------


def test_allowed_origin_gets_its_origin_back_with_vary_and_exposed_headers(
    exact_edge: RunningEdge, upstream: UpstreamApp
) -> None:
    response = get(exact_edge, "/echo", APP_ORIGIN)
    assert response.status_code == 200
    assert response.headers.get_list("access-control-allow-origin") == [APP_ORIGIN]
    assert "origin" in vary(response)
    exposed = tokens(response.headers.get_list("access-control-expose-headers"))
    assert exposed >= ALWAYS_EXPOSED
    # Without credentials configured, none are granted.
    assert "access-control-allow-credentials" not in response.headers


@pytest.mark.parametrize(
    "origin",
    [
        EVIL_ORIGIN,
        "https://other.example.com",
        "http://app.example.com",
        "https://app.example.com:8443",
        "https://app.example.com.evil.org",
    ],
)
def test_disallowed_origin_is_forwarded_without_cors_headers_but_with_vary(
    exact_edge: RunningEdge, upstream: UpstreamApp, origin: str
) -> None:
    path = unique_path()
    response = get(exact_edge, path, origin)
    assert response.status_code == 200
    assert forwarded(upstream, path), "a simple request from a disallowed origin must still be forwarded"
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-expose-headers" not in response.headers
    assert "access-control-allow-credentials" not in response.headers
    assert "origin" in vary(response)


def test_response_to_a_request_without_origin_still_varies_on_origin(exact_edge: RunningEdge) -> None:
    response = get(exact_edge, "/echo")
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    assert "origin" in vary(response), "a cache could serve this response to an allowed origin"


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://a.example.com", True),
        ("https://a.b.example.com", True),
        ("https://A.Example.COM", True),
        ("https://example.com", False),
        ("http://a.example.com", False),
        ("https://a.example.com.evil.org", False),
        ("https://evilexample.com", False),
        ("https://a.example.com:8443", False),
        ("https://.example.com", False),
    ],
)
def test_subdomain_pattern(wildcard_edge: RunningEdge, origin: str, allowed: bool) -> None:
    response = get(wildcard_edge, "/echo", origin)
    assert response.status_code == 200
    if allowed:
        assert response.headers.get_list("access-control-allow-origin") == [origin]
    else:
        assert "access-control-allow-origin" not in response.headers
    assert "origin" in vary(response)


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://a.example.com", True),
        ("https://a.b.example.com", True),
        ("https://example.com", False),
        ("http://a.example.com", False),
        ("https://a.example.com.evil.org", False),
        ("https://evilexample.com", False),
    ],
)
def test_subdomain_pattern_preflight(
    wildcard_edge: RunningEdge, upstream: UpstreamApp, origin: str, allowed: bool
) -> None:
    path = unique_path()
    response = preflight(wildcard_edge, path, origin, "POST")
    assert response.status_code == (204 if allowed else 403)
    assert not forwarded(upstream, path)


# -- preflights -------------------------------------------------------------------------------------


@pytest.mark.parametrize("requested", ["Content-Type, X-Request-ID", "content-type, x-request-id", "AUTHORIZATION"])
def test_allowed_preflight_is_answered_at_the_edge(
    exact_edge: RunningEdge, upstream: UpstreamApp, requested: str
) -> None:
    path = unique_path()
    response = preflight(exact_edge, path, APP_ORIGIN, "PATCH", requested)
    assert response.status_code == 204
    assert response.content == b""
    assert response.headers.get_list("access-control-allow-origin") == [APP_ORIGIN]
    assert "PATCH" in {method.upper() for method in tokens(response.headers.get_list("access-control-allow-methods"))}
    assert response.headers.get_list("access-control-max-age") == [str(MAX_AGE)]
    allowed_headers = tokens(response.headers.get_list("access-control-allow-headers"))
    assert allowed_headers >= tokens([requested])
    assert "origin" in vary(response)
    assert not forwarded(upstream, path), "a preflight must never reach the upstream"


def test_allowed_preflight_without_requested_headers(exact_edge: RunningEdge, upstream: UpstreamApp) -> None:
    path = unique_path()
    response = preflight(exact_edge, path, APP_ORIGIN, "GET")
    assert response.status_code == 204
    assert response.headers.get_list("access-control-allow-origin") == [APP_ORIGIN]
    assert not forwarded(upstream, path)


@pytest.mark.parametrize(
    ("origin", "method", "requested"),
    [
        (EVIL_ORIGIN, "POST", None),
        ("https://other.example.com", "GET", None),
        (APP_ORIGIN, "PROPFIND", None),
        (APP_ORIGIN, "POST", "X-Secret"),
        (APP_ORIGIN, "POST", "content-type, x-secret"),
        ("null", "GET", None),
    ],
    ids=["origin", "other-subdomain", "method", "header", "one-of-the-headers", "null-origin"],
)
def test_refused_preflight_is_403_envelope_and_never_forwarded(
    exact_edge: RunningEdge, upstream: UpstreamApp, origin: str, method: str, requested: str | None
) -> None:
    path = unique_path()
    response = preflight(exact_edge, path, origin, method, requested)
    assert response.status_code == 403
    assert_envelope(403, header_pairs(response), response.content, "cors_forbidden")
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-methods" not in response.headers
    assert "origin" in vary(response)
    assert not forwarded(upstream, path)


@pytest.mark.parametrize("origin", [APP_ORIGIN, None])
def test_options_without_request_method_is_forwarded_as_an_ordinary_request(
    exact_edge: RunningEdge, upstream: UpstreamApp, origin: str | None
) -> None:
    path = unique_path()
    response = get(exact_edge, path, origin, method="OPTIONS")
    assert response.status_code == 200
    assert response.json()["method"] == "OPTIONS"
    recorded = [request for request in upstream.record.requests if request.raw_path == path.encode()]
    assert [request.method for request in recorded] == ["OPTIONS"]
    if origin is not None:
        assert response.headers.get_list("access-control-allow-origin") == [APP_ORIGIN]


# -- the null origin, credentials, any origin -------------------------------------------------------


@pytest.mark.parametrize("edge_name", ["exact_edge", "any_origin_edge"])
def test_null_origin_is_never_allowed(request: pytest.FixtureRequest, upstream: UpstreamApp, edge_name: str) -> None:
    edge: RunningEdge = request.getfixturevalue(edge_name)
    response = get(edge, "/echo", "null")
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    path = unique_path()
    refused = preflight(edge, path, "null", "GET")
    assert refused.status_code == 403
    assert_envelope(403, header_pairs(refused), refused.content, "cors_forbidden")
    assert "access-control-allow-origin" not in refused.headers
    assert not forwarded(upstream, path)


def test_credentials_allow_the_exact_origin_only(credentials_edge: RunningEdge) -> None:
    response = get(credentials_edge, "/echo", APP_ORIGIN)
    assert response.headers.get_list("access-control-allow-origin") == [APP_ORIGIN]
    assert response.headers.get_list("access-control-allow-credentials") == ["true"]
    assert "origin" in vary(response)

    answered = preflight(credentials_edge, "/echo", APP_ORIGIN, "POST", "content-type")
    assert answered.status_code == 204
    assert answered.headers.get_list("access-control-allow-origin") == [APP_ORIGIN]
    assert answered.headers.get_list("access-control-allow-credentials") == ["true"]

    refused = get(credentials_edge, "/echo", EVIL_ORIGIN)
    assert "access-control-allow-origin" not in refused.headers
    assert "access-control-allow-credentials" not in refused.headers


def test_any_origin_without_credentials_is_a_star_without_vary(any_origin_edge: RunningEdge) -> None:
    for origin in (APP_ORIGIN, EVIL_ORIGIN):
        response = get(any_origin_edge, "/echo", origin)
        assert response.headers.get_list("access-control-allow-origin") == ["*"]
        assert "access-control-allow-credentials" not in response.headers
        assert "origin" not in vary(response)
    answered = preflight(any_origin_edge, "/echo", EVIL_ORIGIN, "PUT")
    assert answered.status_code == 204
    assert answered.headers.get_list("access-control-allow-origin") == ["*"]
    assert "origin" not in vary(answered)


# -- start-up refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"cors_allow_origins": ["*"], "cors_allow_credentials": True},
        {"cors_allow_origins": ["*"], "environment": "production"},
        {"cors_allow_origins": ["https://*.com"]},
        {"cors_allow_origins": ["https://a.*.example.com"]},
        {"cors_allow_origins": ["ftp://x.example.com"]},
        {"cors_allow_origins": ["https://app.example.com/path"]},
        {"cors_allow_origins": [APP_ORIGIN, "https://*.com"]},
    ],
    ids=[
        "star-with-credentials",
        "star-in-production",
        "star-dot-tld",
        "inner-star",
        "ftp",
        "path",
        "one-bad",
    ],
)
def test_unsafe_or_malformed_origins_are_refused_at_start_up(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        EdgeSettings(**overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "overrides",
    [
        {"cors_allow_origins": ["*"]},
        {"cors_allow_origins": ["https://*.example.com", APP_ORIGIN], "cors_allow_credentials": True},
        {"cors_allow_origins": [APP_ORIGIN, "http://localhost:5173"], "environment": "production"},
    ],
    ids=["star-in-development", "pattern-with-credentials", "exact-in-production"],
)
def test_sound_origin_settings_are_accepted(overrides: dict[str, object]) -> None:
    settings = EdgeSettings(**overrides)  # type: ignore[arg-type]
    assert settings.cors_allow_origins == overrides["cors_allow_origins"]


# -- WebSocket upgrades -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws_edge(scripted: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    with running_edge(scripted[0].url, cors_allow_origins=[APP_ORIGIN]) as edge:
        yield edge


@pytest.fixture(scope="module")
def closed_ws_edge(scripted: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    """No origin allowed at all."""
    with running_edge(scripted[0].url) as edge:
        yield edge


def open_ws(edge: RunningEdge, path: str, origin: str | None) -> ClientConnection:
    return connect(
        f"ws://127.0.0.1:{edge.port}{path}",
        origin=Origin(origin) if origin is not None else None,
        open_timeout=5,
        close_timeout=2,
        proxy=None,
    )


def assert_echoes(ws: ClientConnection) -> None:
    ws.send("ping")
    assert ws.recv(timeout=5) == "ping"


@pytest.mark.parametrize(
    "origin", [EVIL_ORIGIN, "https://other.example.com", "null", "http://127.0.0.1:1", "http://localhost"]
)
def test_websocket_from_a_disallowed_origin_is_refused_before_the_upstream(
    ws_edge: RunningEdge, scripted: tuple[ServerThread, UpstreamApp], origin: str
) -> None:
    path = unique_path("/ws")
    with pytest.raises(InvalidStatus) as refused:
        open_ws(ws_edge, path, origin)
    response = refused.value.response
    assert response.status_code == 403
    headers = [(name.lower(), value) for name, value in response.headers.raw_items()]
    assert_envelope(403, headers, bytes(response.body or b""), "cors_forbidden")
    assert not scripted[1].record.saw_path(path), "a refused upgrade reached the upstream"


def test_websocket_from_an_allowed_origin_works(
    ws_edge: RunningEdge, scripted: tuple[ServerThread, UpstreamApp]
) -> None:
    path = unique_path("/ws")
    with open_ws(ws_edge, path, APP_ORIGIN) as ws:
        assert_echoes(ws)
    assert scripted[1].record.saw_path(path)


def test_websocket_from_the_edges_own_origin_works_with_an_empty_allow_list(
    closed_ws_edge: RunningEdge, scripted: tuple[ServerThread, UpstreamApp]
) -> None:
    path = unique_path("/ws")
    with open_ws(closed_ws_edge, path, f"http://127.0.0.1:{closed_ws_edge.port}") as ws:
        assert_echoes(ws)
    assert scripted[1].record.saw_path(path)
    # The same allow-list refuses any other origin: the own-origin rule is what let it in.
    with pytest.raises(InvalidStatus) as refused:
        open_ws(closed_ws_edge, unique_path("/ws"), APP_ORIGIN)
    assert refused.value.response.status_code == 403


def test_websocket_without_origin_works(
    closed_ws_edge: RunningEdge, scripted: tuple[ServerThread, UpstreamApp]
) -> None:
    path = unique_path("/ws")
    with open_ws(closed_ws_edge, path, None) as ws:
        assert_echoes(ws)
    handshakes = [seen for seen in scripted[1].record.websockets if seen.raw_path == path.encode()]
    assert len(handshakes) == 1
    assert not handshakes[0].header(b"origin")


# -- the upstream's own CORS headers ------------------------------------------------------------------


@pytest.mark.parametrize("origin", [APP_ORIGIN, EVIL_ORIGIN])
def test_upstream_cors_headers_never_reach_the_client(ws_edge: RunningEdge, origin: str) -> None:
    """CORS is decided at the edge: an upstream's own answer would duplicate or contradict it."""
    response = get(
        ws_edge,
        "/anything?header=Access-Control-Allow-Origin: *&header=Access-Control-Allow-Credentials: true",
        origin=origin,
    )
    assert response.status_code == 200
    allow_origin = response.headers.get_list("access-control-allow-origin")
    if origin == APP_ORIGIN:
        assert allow_origin == [APP_ORIGIN]
    else:
        assert allow_origin == []
    assert response.headers.get_list("access-control-allow-credentials") == []
