"""A circuit breaker per provider and upstream authority, on the `circuitbreaker` package.

The package's `CircuitBreaker`, used through its public API only, keeps the state: closed,
open from the instant it is tripped for `open_seconds` (its recovery timeout), then
half-open on its own once that time has passed (its `state`), and closed again by its
`reset()`. It is tripped by reporting one failure through its context manager with a
threshold of 1, and keeps that failure (`last_failure`). What it lacks for an HTTP
dependency sits on top, here:

- it trips on N consecutive failures and any success resets it; this one decides when to
  trip from the failure *rate* over the last `window_size` calls (none older than
  `window_seconds`), once `minimum_calls` have been seen (resilience4j, Polly);
- half-open, it lets every call through; this one admits `half_open_probes` calls and
  decides from them: one failure re-opens, that many successes close;
- it only judges raised exceptions, and counts a cancellation (`asyncio.CancelledError`
  is not an `Exception`) as a success; this one is told outcomes by the transport, which
  classifies HTTP responses without raising them and reports no outcome for a cancelled
  call;
- its remaining open time is rounded up to whole seconds; here it is exact.

A call takes a permit (`acquire`) and hands it back with its outcome. Permits carry the
breaker's generation, which changes at every transition, so an outcome arriving after the
state moved on - a slow call admitted before the breaker opened - cannot count twice or
pose as a probe. docs/resilience.md#the-breaker has the whole comparison.

Calls run on one event loop and nothing here awaits, so no lock is needed.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from time import monotonic

from circuitbreaker import (  # type: ignore[import-untyped]  # the package ships no type information
    STATE_CLOSED,
    STATE_HALF_OPEN,
    STATE_OPEN,
    CircuitBreaker,
)

from app.outbound.errors import BreakerOpen
from app.outbound.policy import HostPolicy

logger = logging.getLogger("app.outbound")

Permit = int


class Tripped(Exception):
    """What the package is told when the window (or a failed probe) decides to open it."""


class Breaker:
    def __init__(
        self, name: str, authority: str, policy: HostPolicy, on_moved: Callable[[str], None] | None = None
    ) -> None:
        self.name = name
        self.on_moved = on_moved  # told each new state (the transitions' counter)
        self.authority = authority
        self.policy = policy
        self._circuit = CircuitBreaker(
            failure_threshold=1,  # the window decides; one reported failure opens it
            recovery_timeout=policy.open_seconds,
            expected_exception=Tripped,
            name=f"{name} {authority}",
        )
        self._logged_state: str = STATE_CLOSED  # the last transition logged, and counted in the generation
        self._opened_at = 0.0  # the package keeps its own, but reports it rounded to whole seconds
        self._outcomes: deque[tuple[float, bool]] = deque()  # (when, failed), oldest first
        self._failure_count = 0
        self._latest_failure = ""  # the window's newest failure: a success can complete the trip
        self._generation = 0
        self._probes_in_flight = 0
        self._probe_successes = 0

    @property
    def state(self) -> str:
        """`closed`, `open` or `half_open` (once the open time is over, before any probe)."""
        return str(self._circuit.state)

    @property
    def open_remaining(self) -> float:
        """Seconds until a probe is let through; 0 unless open."""
        if self.state != STATE_OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.policy.open_seconds - monotonic())

    @property
    def failure_rate(self) -> float:
        return self._failure_count / len(self._outcomes) if self._outcomes else 0.0

    def acquire(self) -> Permit:
        """A permit for one call, or `BreakerOpen` with the time left open."""
        state = self.state
        if state == STATE_CLOSED:
            return self._generation
        if state == STATE_OPEN:
            raise BreakerOpen(self.authority, self.open_remaining)
        if self._logged_state == STATE_OPEN:  # the package turned half-open by itself
            self._moved(STATE_HALF_OPEN)
        if self._probes_in_flight + self._probe_successes >= self.policy.half_open_probes:
            raise BreakerOpen(self.authority, 0.0)
        self._probes_in_flight += 1
        return self._generation

    def record_success(self, permit: Permit) -> None:
        if permit != self._generation:
            return
        if self._logged_state == STATE_CLOSED:
            self._record(failed=False)
            return
        self._probes_in_flight -= 1
        self._probe_successes += 1
        if self._probe_successes >= self.policy.half_open_probes:
            last_failure = self._last_failure()
            self._circuit.reset()
            self._moved(STATE_CLOSED, last_failure)

    def record_failure(self, permit: Permit, cause: BaseException | str) -> None:
        """`cause`: the error, or a description such as `HTTP 503`, for the log."""
        if permit != self._generation:
            return
        description = cause if isinstance(cause, str) else repr(cause)
        if self._logged_state == STATE_HALF_OPEN:
            self._trip(description)
            return
        self._latest_failure = description
        self._record(failed=True)

    def release(self, permit: Permit) -> None:
        """Hands back a permit without an outcome: cancelled, or not the upstream's doing."""
        if permit == self._generation and self._logged_state == STATE_HALF_OPEN:
            self._probes_in_flight -= 1

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
            self._trip(self._latest_failure)

    def _trip(self, cause: str) -> None:
        # The package's one public way to count a failure is its context manager.
        try:
            with self._circuit:
                raise Tripped(cause)
        except Tripped:
            pass
        self._opened_at = monotonic()
        self._moved(STATE_OPEN, cause)

    def _last_failure(self) -> str | None:
        tripped = self._circuit.last_failure
        return str(tripped) if tripped is not None else None

    def _moved(self, state: str, last_failure: str | None = None) -> None:
        """Starts a new generation in `state` and logs the transition."""
        previous = self._logged_state
        rate, calls = self.failure_rate, len(self._outcomes)
        self._logged_state = state
        self._generation += 1
        if self.on_moved is not None:
            self.on_moved(state)
        self._probes_in_flight = 0
        self._probe_successes = 0
        if state != STATE_HALF_OPEN:
            # A new window starts once the breaker closes; what tripped it is in the log.
            self._outcomes.clear()
            self._failure_count = 0
        logger.log(
            logging.WARNING if state == STATE_OPEN else logging.INFO,
            "circuit breaker for %s at %s: %s -> %s",
            self.name,
            self.authority,
            previous,
            state,
            extra={
                "provider": self.name,
                "authority": self.authority,
                "from_state": previous,
                "to_state": state,
                "failure_rate": round(rate, 3),
                "calls_in_window": calls,
                "last_failure": last_failure if last_failure is not None else self._last_failure(),
            },
        )
