"""When to send a request again, how long to wait first, and how many retries a host may get.

Only where it is safe: a request that never left (connect errors), an explicit "try again
later" (429 or 503 with a Retry-After), or any retryable failure of an idempotent request.
Retrying an LLM or TTS POST after a read timeout could bill twice, so that is never done.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from email.utils import parsedate_to_datetime

import httpx

from app.outbound.classify import (
    NOT_SENT_ERRORS,
    RETRYABLE_STATUSES,
    SERVICE_UNAVAILABLE,
    TOO_MANY_REQUESTS,
    is_upstream_failure,
)
from app.outbound.policy import HostPolicy

# Retries and calls are counted over this many recent seconds (Finagle's RetryBudget TTL).
RETRY_BUDGET_WINDOW = 10.0


def retry_after_seconds(headers: httpx.Headers, cap: float) -> float | None:
    """The wait a response asks for, capped: `retry-after-ms` (what the OpenAI-style SDKs
    read), else `Retry-After` as delay-seconds or an HTTP date (RFC 9110). None if absent
    or unreadable."""
    wait: float | None = None
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        wait = _finite(milliseconds)
        wait = wait / 1000 if wait is not None else None
    if wait is None:
        value = headers.get("retry-after")
        if value is None:
            return None
        wait = _finite(value)
        if wait is None:
            try:
                wait = parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                return None
    return min(max(wait, 0.0), cap)


def _finite(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def backoff(policy: HostPolicy, resend_count: int) -> float:
    """Exponential backoff with full jitter: spreads the retries of many callers that
    failed together instead of sending them back in one wave."""
    ceiling = min(policy.backoff_max, policy.backoff_base * 2.0**resend_count)
    return random.random() * ceiling  # noqa: S311 - jitter, not cryptography


def delay_before_retry(
    policy: HostPolicy,
    *,
    idempotent: bool,
    resend_count: int,
    status: int | None = None,
    retry_after: float | None = None,
    error: BaseException | None = None,
) -> float | None:
    """How long to wait before attempt `resend_count + 1`, or None where a retry is unsafe
    or pointless. The caller still checks the deadline and the budget."""
    if resend_count >= policy.max_retries:
        return None
    if error is not None:
        if isinstance(error, NOT_SENT_ERRORS) or (idempotent and is_upstream_failure(error)):
            return backoff(policy, resend_count)
        return None
    if retry_after is not None and status in (TOO_MANY_REQUESTS, SERVICE_UNAVAILABLE):
        return retry_after  # an explicit refusal: the request was not processed
    if idempotent and status in RETRYABLE_STATUSES:
        return backoff(policy, resend_count)
    return None


class RetryBudget:
    """Retries allowed per host: at most `ratio` of the calls of the last
    `RETRY_BUDGET_WINDOW` seconds, but always `minimum` (a quiet host still gets a retry).

    When a host fails outright, every call wants its retries; the budget keeps the extra
    load near `ratio` instead of multiplying it by `max_retries + 1` (Envoy's retry budget).
    """

    def __init__(self, ratio: float, minimum: int) -> None:
        self.ratio = ratio
        self.minimum = minimum
        self._calls: deque[float] = deque()
        self._retries: deque[float] = deque()

    def record_call(self, now: float) -> None:
        self._calls.append(now)
        _forget_before(self._calls, now - RETRY_BUDGET_WINDOW)

    def try_spend(self, now: float) -> bool:
        _forget_before(self._calls, now - RETRY_BUDGET_WINDOW)
        _forget_before(self._retries, now - RETRY_BUDGET_WINDOW)
        if len(self._retries) >= max(self.minimum, self.ratio * len(self._calls)):
            return False
        self._retries.append(now)
        return True


def _forget_before(times: deque[float], oldest_kept: float) -> None:
    while times and times[0] < oldest_kept:
        times.popleft()
