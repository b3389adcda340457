"""Support for the edge-concern tests: request heads for a raw socket, and checks shared by
the CORS, response-header and size-limit suites. The upstream they script through its
query string (`status=`, `type=`, `header=`) is `tests.servers.UpstreamApp`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator

import httpx

from tests.servers import UpstreamApp
from tests.wire import WireResponse

APP_ORIGIN = "https://app.example.com"
EVIL_ORIGIN = "https://evil.example.org"

ALWAYS_EXPOSED = {"x-request-id", "ratelimit", "ratelimit-policy", "retry-after"}
API_CSP = "default-src 'none'; frame-ancestors 'none'"
ONE_YEAR = 31536000


def times_forwarded(upstream: UpstreamApp, path: str) -> int:
    """How many requests for exactly `path` reached the upstream."""
    return upstream.record.paths().count(path.encode())


def unique_path(prefix: str = "/echo") -> str:
    """A path no other test uses, so a request can be looked for in a shared upstream's record."""
    return f"{prefix}/{uuid.uuid4().hex}"


# -- requests on a raw socket ---------------------------------------------------------------------


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


def header_pairs(response: httpx.Response | WireResponse) -> list[tuple[str, str]]:
    """A response's headers as they came, repeats kept, names lower-cased."""
    raw = response.headers.raw if isinstance(response, httpx.Response) else response.headers
    return [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in raw]


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
