"""What the transport raises when it refuses or gives up on a call.

Every error is an `httpx.TransportError`, so a caller written against plain httpx already
handles them; the subclasses say why, and carry how long to wait where that is known.
A response that failed (5xx, 408, 498) is never turned into one of these: after the
retries it is returned unchanged and the caller decides.
"""

from __future__ import annotations

import httpx


class OutboundError(httpx.TransportError):
    """Raised by the shared outbound transport itself, not by the network."""


class BreakerOpen(OutboundError):
    """The authority's breaker is open (or its half-open probes are all in flight)."""

    def __init__(self, authority: str, retry_after: float) -> None:
        super().__init__(f"circuit breaker for {authority} is open; retry in {retry_after:.2f} s")
        self.authority = authority
        self.retry_after = retry_after  # seconds until the breaker lets a probe through


class HostRateLimited(OutboundError):
    """An earlier 429 from this authority asked callers to wait until a later instant."""

    def __init__(self, authority: str, retry_after: float) -> None:
        super().__init__(f"{authority} asked to wait; retry in {retry_after:.2f} s")
        self.authority = authority
        self.retry_after = retry_after


class BulkheadFull(OutboundError):
    """Every concurrency slot for the authority stayed busy for the whole bounded wait."""

    def __init__(self, authority: str, max_concurrency: int, waited: float) -> None:
        super().__init__(f"all {max_concurrency} concurrent call slots for {authority} stayed busy for {waited:.2f} s")
        self.authority = authority
        self.max_concurrency = max_concurrency
        self.waited = waited


class DeadlineExceeded(OutboundError, httpx.TimeoutException):
    """The call's total deadline ran out (an `httpx.TimeoutException` too)."""

    def __init__(self, authority: str, deadline: float) -> None:
        super().__init__(f"call to {authority} ran out of its {deadline:g} s deadline")
        self.authority = authority
        self.deadline = deadline
