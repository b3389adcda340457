"""Support for the edge-concern tests: a scripted upstream, a raw HTTP/1.1 client, and checks
shared by the CORS, response-header and size-limit suites.

`ScriptedUpstream` answers any path; the query string picks the answer, so one server can
play an app that serves HTML, sets its own `Cache-Control`, or leaks `Server`:

- `status=N` the status (default 200);
- `type=html|js|text|json` the content type (default JSON);
- `header=Name: Value`, repeatable, extra response headers.

The body is always the JSON of what it saw (method, path, headers, body length), whatever
the content type claims (none for 204 and 304). Every HTTP request and every WebSocket handshake is recorded;
WebSocket sessions are accepted and echo text.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import httpx
from starlette.types import Receive, Scope, Send

from tests.servers import ServerThread, UpstreamApp, serve
from tests.wire import WireClient

APP_ORIGIN = "https://app.example.com"
EVIL_ORIGIN = "https://evil.example.org"

CONTENT_TYPES = {
    "html": b"text/html; charset=utf-8",
    "js": b"text/javascript",
    "text": b"text/plain",
    "json": b"application/json",
}

ALWAYS_EXPOSED = {"x-request-id", "ratelimit", "ratelimit-policy", "retry-after"}
API_CSP = "default-src 'none'; frame-ancestors 'none'"
ONE_YEAR = 31536000


def times_forwarded(upstream: UpstreamApp, path: str) -> int:
    """How many requests for exactly `path` reached the upstream."""
    return upstream.record.paths().count(path.encode())


def unique_path(prefix: str = "/echo") -> str:
    """A path no other test uses, so a request can be looked for in a shared upstream's record."""
    return f"{prefix}/{uuid.uuid4().hex}"


# -- the scripted upstream ------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body_length: int

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]


class ScriptedUpstream:
    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.websockets: list[Seen] = []

    def saw_path(self, path: str) -> bool:
        return any(seen.path == path for seen in [*self.requests, *self.websockets])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        if scope["type"] == "websocket":
            self.websockets.append(Seen("WEBSOCKET", scope["path"], headers, 0))
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                await send({"type": "websocket.send", "text": message.get("text") or ""})
        assert scope["type"] == "http"
        length = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            length += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        seen = Seen(scope["method"], scope["path"], headers, length)
        self.requests.append(seen)

        query = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        status = 200
        response_headers = [(b"content-type", CONTENT_TYPES["json"])]
        for key, value in query:
            if key == "status":
                status = int(value)
            elif key == "type":
                response_headers[0] = (b"content-type", CONTENT_TYPES[value])
            elif key == "header":
                name, _, field_value = value.partition(":")
                response_headers.append((name.strip().encode(), field_value.strip().encode()))
        body = json.dumps(
            {"method": seen.method, "path": seen.path, "headers": seen.headers, "body_length": length}
        ).encode()
        if status in (204, 304):
            body = b""  # no content, and no framing
        else:
            response_headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": body})


def start_scripted_upstream() -> tuple[ServerThread, ScriptedUpstream]:
    app = ScriptedUpstream()
    return serve(app), app


# -- a raw HTTP/1.1 client ------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]  # names lower-cased
    body: bytes

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


class RawConnection(WireClient):
    """The wire client with headers as lower-cased text, as these suites compare them."""

    def read_response(self, *, head_request: bool = False) -> RawResponse:  # type: ignore[override]
        response = super().read_response(head_request=head_request)
        headers = [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in response.headers]
        return RawResponse(response.status, headers, response.body)


def request_head(method: str, path: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- shared checks --------------------------------------------------------------------------------


def tokens(values: Iterator[str] | list[str]) -> set[str]:
    """The comma-separated tokens of every copy of a header, lower-cased."""
    return {token.strip().lower() for value in values for token in value.split(",") if token.strip()}


def csp_directives(value: str) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for part in value.split(";"):
        words = part.split()
        if words:
            directives[words[0].lower()] = words[1:]
    return directives


def hsts_max_age(value: str) -> int:
    for part in value.split(";"):
        name, _, number = part.strip().partition("=")
        if name.lower() == "max-age":
            return int(number.strip('"'))
    raise AssertionError(f"no max-age in {value!r}")


def assert_common_security_headers(headers: list[tuple[str, str]], besides: str = "") -> None:
    """The headers both presets carry, each exactly once; `besides` names one the upstream
    set itself, whose value is its own."""
    expected: dict[str, Callable[[str], bool]] = {
        "strict-transport-security": lambda value: hsts_max_age(value) >= ONE_YEAR,
        "x-frame-options": lambda value: value.upper() == "DENY",
        "x-content-type-options": lambda value: value.lower() == "nosniff",
        "referrer-policy": bool,
        "permissions-policy": lambda value: "microphone=(self)" in value.replace(" ", ""),
        "cross-origin-opener-policy": lambda value: value == "same-origin",
        "cross-origin-resource-policy": lambda value: value == "same-origin",
        "content-security-policy": bool,
    }
    for name, check in expected.items():
        values = [value for key, value in headers if key == name]
        assert len(values) == 1, f"{name}: expected exactly one, got {values}"
        assert name == besides or check(values[0]), f"{name}: {values[0]!r}"


def assert_api_security_headers(headers: list[tuple[str, str]]) -> None:
    assert_common_security_headers(headers)
    csp = [value for key, value in headers if key == "content-security-policy"]
    assert csp == [API_CSP]


def is_uuid7(value: str) -> bool:
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return False
    return str(parsed) == value and parsed.version == 7 and parsed.variant == uuid.RFC_4122


def uuid7_millis(value: str) -> int:
    return uuid.UUID(value).int >> 80


def now_millis() -> int:
    return time.time_ns() // 1_000_000


def header_pairs(response: httpx.Response) -> list[tuple[str, str]]:
    """A response's headers as they came, repeats kept, names lower-cased."""
    return [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in response.headers.raw]


def assert_envelope(status: int, headers: list[tuple[str, str]], body: bytes, code: str) -> None:
    """The edge's error envelope, whose request id is the one in `X-Request-ID`."""
    assert [value for key, value in headers if key == "content-type"] == ["application/json"]
    document = json.loads(body)
    assert set(document) == {"error"}
    assert document["error"]["code"] == code, f"status {status}: {document}"
    assert isinstance(document["error"]["message"], str)
    assert document["error"]["message"]
    request_ids = [value for key, value in headers if key == "x-request-id"]
    assert len(request_ids) == 1, f"expected one x-request-id, got {request_ids}"
    assert document["error"]["request_id"] == request_ids[0]
