"""A circuit breaker per upstream authority, built on the `circuitbreaker` package.

The package's `CircuitBreaker` supplies the state names, the open instant and recovery
timeout with the lazy open -> half-open transition, the failure predicate and the last
failure. What it lacks for an HTTP dependency is added here:

- it trips on N consecutive failures and any success resets it; this one trips on the
  failure *rate* over the last `window_size` calls (none older than `window_seconds`),
  once `minimum_calls` have been seen (resilience4j, Polly);
- half-open, it lets every call through; this one admits `half_open_probes` calls and
  decides from them: one failure re-opens, that many successes close;
- it only judges raised exceptions; this one is told outcomes, so the transport can
  classify HTTP responses without raising them;
- its context manager resets the breaker when `asyncio.CancelledError` passes (not an
  `Exception`, so not a failure, so a success); here a caller's cancellation returns its
  permit and records nothing;
- its remaining open time is rounded up to whole seconds; here it is exact.

A call takes a permit (`acquire`) and hands it back with its outcome. Permits carry the
breaker's generation, which changes at every transition, so an outcome arriving after the
state moved on - a slow call admitted before the breaker opened - cannot count twice or
pose as a probe.

Calls run on one event loop and nothing here awaits, so no lock is needed.
"""

from __future__ import annotations

import logging
from collections import deque
from time import monotonic

from circuitbreaker import (  # type: ignore[import-untyped]
    STATE_CLOSED,
    STATE_HALF_OPEN,
    STATE_OPEN,
    CircuitBreaker,
)

from app.outbound.classify import is_upstream_failure
from app.outbound.errors import BreakerOpen
from app.outbound.policy import HostPolicy

logger = logging.getLogger("app.outbound")

Permit = int


class Breaker(CircuitBreaker):  # type: ignore[misc]  # the package ships no type information
    # The base class's own state, typed here.
    _state: str
    _opened: float
    _recovery_timeout: float
    _failure_count: int
    _last_failure: BaseException | str | None

    def __init__(self, authority: str, policy: HostPolicy) -> None:
        # The base class's consecutive-failure threshold is left unused: the window decides.
        super().__init__(
            recovery_timeout=policy.open_seconds,
            expected_exception=is_upstream_failure,
            name=authority,
        )
        self.authority = authority
        self.policy = policy
        self._outcomes: deque[tuple[float, bool]] = deque()  # (when, failed), oldest first
        self._generation = 0
        self._probes_in_flight = 0
        self._probe_successes = 0

    def __enter__(self) -> None:
        # The base class's context manager (and its decorator, which uses it) cannot hand
        # an outcome back with its permit, and would count a cancellation as a success.
        raise TypeError("use Breaker.acquire() and record_success/record_failure/release(permit)")

    @property
    def open_remaining(self) -> float:
        """Seconds until a probe is let through; 0 unless open."""
        if self._state != STATE_OPEN:
            return 0.0
        return max(0.0, self._opened + self._recovery_timeout - monotonic())

    @property
    def failure_rate(self) -> float:
        return self._failure_count / len(self._outcomes) if self._outcomes else 0.0

    def acquire(self) -> Permit:
        """A permit for one call, or `BreakerOpen` with the time left open."""
        if self._state == STATE_CLOSED:
            return self._generation
        if self._state == STATE_OPEN:
            remaining = self.open_remaining
            if remaining > 0:
                raise BreakerOpen(self.authority, remaining)
            self._enter(STATE_HALF_OPEN)
        if self._probes_in_flight + self._probe_successes >= self.policy.half_open_probes:
            raise BreakerOpen(self.authority, 0.0)
        self._probes_in_flight += 1
        return self._generation

    def record_success(self, permit: Permit) -> None:
        if permit != self._generation:
            return
        if self._state == STATE_CLOSED:
            self._record(failed=False)
            return
        self._probes_in_flight -= 1
        self._probe_successes += 1
        if self._probe_successes >= self.policy.half_open_probes:
            self.reset()

    def record_failure(self, permit: Permit, cause: BaseException | str) -> None:
        """`cause`: the error, or a description such as `HTTP 503`, for the log."""
        if permit != self._generation:
            return
        self._last_failure = cause
        if self._state == STATE_HALF_OPEN:
            self._enter(STATE_OPEN)
            return
        self._record(failed=True)

    def release(self, permit: Permit) -> None:
        """Hands back a permit without an outcome: cancelled, or not the upstream's doing."""
        if permit == self._generation and self._state == STATE_HALF_OPEN:
            self._probes_in_flight -= 1

    def reset(self) -> None:
        """Closes the breaker with an empty window (the base class's name for it)."""
        self._enter(STATE_CLOSED)

    def _record(self, *, failed: bool) -> None:
        """Adds a closed-state outcome to the window and trips if the rate is reached (after
        a success too, as in resilience4j: the call that completes the minimum counts)."""
        now = monotonic()
        outcomes = self._outcomes
        policy = self.policy
        outcomes.append((now, failed))
        self._failure_count += failed
        oldest_kept = now - policy.window_seconds
        while len(outcomes) > policy.window_size or outcomes[0][0] < oldest_kept:
            self._failure_count -= outcomes.popleft()[1]
        if len(outcomes) >= policy.minimum_calls and self.failure_rate >= policy.failure_rate_threshold:
            self._enter(STATE_OPEN)

    def _enter(self, state: str) -> None:
        previous = self._state
        rate, calls = self.failure_rate, len(self._outcomes)
        cause = self._last_failure
        last_failure = cause if isinstance(cause, str) or cause is None else repr(cause)
        self._state = state
        self._generation += 1
        self._probes_in_flight = 0
        self._probe_successes = 0
        if state != STATE_HALF_OPEN:
            # A new window starts once the breaker closes; what tripped it is in the log.
            self._outcomes.clear()
            self._failure_count = 0
        if state == STATE_OPEN:
            self._opened = monotonic()
        logger.log(
            logging.WARNING if state == STATE_OPEN else logging.INFO,
            "circuit breaker for %s: %s -> %s",
            self.authority,
            previous,
            state,
            extra={
                "authority": self.authority,
                "from_state": previous,
                "to_state": state,
                "failure_rate": round(rate, 3),
                "calls_in_window": calls,
                "last_failure": last_failure,
            },
        )
        if state == STATE_CLOSED:
            self._last_failure = None
