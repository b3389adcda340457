"""The project's one error envelope, for every response the edge makes itself.

`{"error": {"code": "...", "message": "...", "request_id": "..."}}` - the same shape the
internal app uses, so a client handles one format whoever answered. A refusal over a limit
names the limit; a 429 names the seconds its `Retry-After` says (docs/edge.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from starlette.types import Scope, Send

from common.envelope import envelope
from edge.scope import EDGE_ERROR_SCOPE_KEY, WEBSOCKET_DENIAL_EXTENSION, Headers


@dataclass(frozen=True, slots=True)
class EdgeError:
    status: int
    code: str
    message: str


BAD_REQUEST = EdgeError(400, "bad_request", "The request is malformed.")
BAD_HOST = EdgeError(400, "bad_request", "The request needs exactly one Host header, a valid host[:port].")
BAD_TARGET = EdgeError(400, "bad_request", "The request target is not a valid path.")
BAD_FRAMING = EdgeError(
    400, "bad_request", "The request body is framed ambiguously: use one Content-Length or chunked alone."
)
REQUEST_TIMEOUT = EdgeError(408, "request_timeout", "The request was not received in time.")
CORS_FORBIDDEN = EdgeError(403, "cors_forbidden", "This cross-origin request is not allowed.")
NOT_FOUND = EdgeError(404, "not_found", "There is nothing at this path.")
METHOD_NOT_ALLOWED = EdgeError(405, "method_not_allowed", "This method is not allowed here.")
INTERNAL_ERROR = EdgeError(500, "internal_error", "The edge failed to handle the request.")
CONNECT_NOT_IMPLEMENTED = EdgeError(501, "not_implemented", "The CONNECT method is not supported.")
TRANSFER_CODING_NOT_IMPLEMENTED = EdgeError(
    501, "not_implemented", "Only the chunked transfer coding is supported for request bodies."
)
UPSTREAM_UNAVAILABLE = EdgeError(502, "upstream_unavailable", "The service could not be reached. Try again shortly.")
UPSTREAM_BUSY = EdgeError(503, "upstream_busy", "The service is at capacity. Try again shortly.")
RATE_LIMIT_UNAVAILABLE = EdgeError(
    503, "rate_limit_unavailable", "Requests cannot be admitted right now. Try again shortly."
)
SHUTTING_DOWN = EdgeError(503, "shutting_down", "The service is restarting. Try again shortly.")
UPSTREAM_TIMEOUT = EdgeError(504, "upstream_timeout", "The service took too long to respond.")
HTTP_VERSION_NOT_SUPPORTED = EdgeError(505, "http_version_not_supported", "Only HTTP/1.0 and HTTP/1.1 are supported.")


def payload_too_large(max_bytes: int) -> EdgeError:
    return EdgeError(413, "payload_too_large", f"The request body is larger than {max_bytes:,} bytes.")


def too_many_header_fields(max_fields: int) -> EdgeError:
    return EdgeError(431, "headers_too_large", f"The request has more than {max_fields:,} header fields.")


def headers_too_large(max_bytes: int) -> EdgeError:
    return EdgeError(431, "headers_too_large", f"The request headers are larger than {max_bytes:,} bytes.")


def rate_limited(retry_after: int) -> EdgeError:
    """`retry_after`: the seconds the response's `Retry-After` says."""
    return EdgeError(429, "rate_limited", f"Too many requests. Retry in {_seconds(retry_after)}.")


def too_many_concurrent_requests(retry_after: int) -> EdgeError:
    """`retry_after`: the seconds the response's `Retry-After` says."""
    return EdgeError(
        429,
        "too_many_concurrent_requests",
        f"Too many requests at once from this client. Retry in {_seconds(retry_after)}.",
    )


def _seconds(count: int) -> str:
    return "1 second" if count == 1 else f"{count} seconds"


class ResponseAborted(Exception):
    """Raised after a response started to make the server cut the client's connection; the
    server logs nothing more, whoever raised it has said why."""


class RequestBodyTimeout(Exception):
    """Raised by the server's `receive()` when the client sends its body too slowly
    (docs/proxy.md, "Slow clients"); whoever reads the body answers 408."""


def request_id_of(scope: Scope) -> str | None:
    """The request id as it is forwarded upstream, if a layer has set one."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            return str(value.decode("latin-1"))
    return None


def error_body(error: EdgeError, request_id: str | None) -> bytes:
    return envelope(error.code, error.message, request_id)


def error_headers(body: bytes, extra: Sequence[tuple[bytes, bytes]] = ()) -> Headers:
    return [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"cache-control", b"no-store"),
        *extra,
    ]


async def send_error(
    scope: Scope, send: Send, error: EdgeError, extra_headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    scope[EDGE_ERROR_SCOPE_KEY] = error.code
    body = error_body(error, request_id_of(scope))
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": error_headers(body, extra_headers),
        }
    )
    await send({"type": "http.response.body", "body": body})


async def deny_websocket(
    scope: Scope, send: Send, error: EdgeError, extra_headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """Refuses a WebSocket upgrade with an HTTP response in the envelope, where the server
    supports that; otherwise with a bare close before accepting (an HTTP 403)."""
    scope[EDGE_ERROR_SCOPE_KEY] = error.code
    if WEBSOCKET_DENIAL_EXTENSION not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    body = error_body(error, request_id_of(scope))
    headers = error_headers(body, extra_headers)
    await send({"type": "websocket.http.response.start", "status": error.status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})
