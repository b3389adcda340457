"""What counts as an upstream failure, and what may be sent again.

A failure is evidence that the upstream is unwell: 5xx, 408, Groq's 498 (capacity
exceeded), timeouts and broken connections. A 4xx is the caller's problem, 429 is the
upstream asking us to slow down (handled apart), and errors of our own making - a
malformed request, an exhausted local pool, the caller's cancellation - say nothing
about the upstream.
"""

from __future__ import annotations

import httpx
from httpx._multipart import MultipartStream  # not exported by httpx; see `is_replayable`

TOO_MANY_REQUESTS = 429
SERVICE_UNAVAILABLE = 503
GROQ_CAPACITY_EXCEEDED = 498

# Statuses worth another attempt of an idempotent request; 501 and 505 would fail again.
RETRYABLE_STATUSES = frozenset({408, 429, GROQ_CAPACITY_EXCEEDED, 500, 502, 503, 504})

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

# Raised before a byte of the request left: sending it again cannot do anything twice.
NOT_SENT_ERRORS: tuple[type[httpx.TransportError], ...] = (httpx.ConnectError, httpx.ConnectTimeout)

UPSTREAM_FAILURE_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectTimeout,
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.NetworkError,  # connect, read, write and close errors: refused, reset, unreachable
    httpx.RemoteProtocolError,  # closed without a response, or a malformed one
)


def is_failure_status(status: int) -> bool:
    return status >= 500 or status == 408 or status == GROQ_CAPACITY_EXCEEDED


def is_upstream_failure(error: BaseException) -> bool:
    """`PoolTimeout` (our own pool full), local protocol errors and cancellation are not
    failures."""
    return isinstance(error, UPSTREAM_FAILURE_ERRORS)


def is_replayable(request: httpx.Request) -> bool:
    """Whether the body can be sent again: bytes can; multipart bodies re-render from their
    fields and seek their files back to the start; a one-shot async iterator cannot."""
    return isinstance(request.stream, httpx.ByteStream | MultipartStream)
