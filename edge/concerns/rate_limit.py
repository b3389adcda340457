"""Rate limiting with `limits`: per-route policies, shared counters, explicit failure mode.

- Limits in `limits` notation, several per route (`10/minute;200/day`); the default from
  `EDGE_RATE_LIMIT_DEFAULT`, per-route ones from the policy file. A request is admitted
  only if every limit of its route admits it.
- The bucket is the route's plus the key parts: `client` (the address resolved through
  trusted proxies, which a client cannot choose), `header:<name>`, or `route` alone for
  one bucket shared by everybody.
- Every response of a limited route carries the IETF `RateLimit-Policy` and `RateLimit`
  fields (draft-ietf-httpapi-ratelimit-headers); a rejection is 429 in the error envelope
  with `Retry-After`.
- The store is asked with a short timeout behind a breaker: after a few failures it is
  left alone for a while, so a dead or slow Redis costs no latency, and requests are
  admitted (`open`) or refused with 503 (`closed`) as `EDGE_RATE_LIMIT_ON_STORE_ERROR`
  says. Entering and leaving that degraded state is logged and counted.
- In dry-run mode decisions are made, counted and logged, never enforced.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from limits import RateLimitItem, parse_many
from limits.aio.storage import Storage as AsyncStorage
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.errors import StorageError
from limits.storage import storage_from_string
from prometheus_client import Counter, Gauge
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge import errors
from edge.concerns.rate_limit_memory import MemoryCounters
from edge.health import State
from edge.policy import Policy, RouteRule, RouteTable
from edge.scope import RATE_LIMIT_DECISION_SCOPE_KEY, Headers, is_edge_path
from edge.settings import RateLimitStrategy, StoreErrorPolicy

logger = logging.getLogger("edge.rate_limit")

ASYNC_STRATEGIES: dict[RateLimitStrategy, type[RateLimiter]] = {
    RateLimitStrategy.moving_window: MovingWindowRateLimiter,
    RateLimitStrategy.sliding_window_counter: SlidingWindowCounterRateLimiter,
    RateLimitStrategy.fixed_window: FixedWindowRateLimiter,
}


@dataclass(frozen=True, slots=True)
class Quota:
    """One limit of a route, with its name in the RateLimit header fields."""

    item: RateLimitItem
    name: str
    field_name: str  # the name as a structured-field string

    @classmethod
    def named(cls, item: RateLimitItem, name: str) -> Quota:
        return cls(item, name, _sf_string(name))


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    label: str
    quotas: tuple[Quota, ...]
    key: tuple[str, ...]
    policy_header: tuple[bytes, bytes]  # RateLimit-Policy, the same on every response

    @classmethod
    def build(cls, label: str, notation: str, key: Sequence[str]) -> RoutePolicy:
        quotas: list[Quota] = []
        for item in parse_many(notation) if notation != "off" else []:
            name = f"{label}-{_window(item.get_expiry())}"
            if any(quota.name == name for quota in quotas):
                name = f"{name}-{item.amount}"
            quotas.append(Quota.named(item, name))
        policy = ", ".join(f"{quota.field_name};q={quota.item.amount};w={quota.item.get_expiry()}" for quota in quotas)
        return cls(label, tuple(quotas), tuple(key), (b"ratelimit-policy", policy.encode()))


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    decision: str  # allowed | limited | store_error_open | store_error_closed
    windows: tuple[tuple[Quota, int, float], ...] = ()  # quota, remaining, reset (epoch seconds)


class StoreBreaker:
    """Leaves a failing store alone for `open_seconds` after `threshold` failures in a row,
    then lets one request probe it."""

    def __init__(self, threshold: int = 3, open_seconds: float = 5.0) -> None:
        self.threshold = threshold
        self.open_seconds = open_seconds
        self.failures = 0
        self.open_until = 0.0
        self.probing = False

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold

    def allows_call(self, now: float) -> bool:
        if not self.is_open:
            return True
        if now < self.open_until or self.probing:
            return False
        self.probing = True
        return True

    def record_success(self) -> bool:
        """Returns whether this closed an open breaker."""
        was_open = self.is_open
        self.failures = 0
        self.probing = False
        return was_open

    def record_failure(self, now: float) -> bool:
        """Returns whether this opened the breaker."""
        was_open = self.is_open
        self.failures += 1
        self.probing = False
        if self.is_open:
            self.open_until = now + self.open_seconds
        return self.is_open and not was_open


class LimitStore:
    """The counters, in memory or in Redis, asked through a timeout and a breaker."""

    def __init__(
        self,
        storage_url: str,
        strategy: RateLimitStrategy,
        *,
        key_prefix: str,
        timeout: float,
        on_error: StoreErrorPolicy,
        errors: Counter,
        degraded: Gauge,
        degraded_seconds: Counter,
    ) -> None:
        self.is_memory = storage_url.startswith("memory://")
        self.storage: AsyncStorage
        if self.is_memory:
            self.storage = MemoryCounters()
        else:
            # One Redis client library for the project: redis-py, not limits' default coredis.
            self.storage = cast(
                AsyncStorage,
                storage_from_string(
                    f"async+{storage_url}",
                    wrap_exceptions=True,
                    implementation="redispy",
                    key_prefix=key_prefix,
                ),
            )
        self.limiter: RateLimiter = ASYNC_STRATEGIES[strategy](self.storage)
        self.timeout = timeout
        self.on_error = on_error
        self.breaker = StoreBreaker()
        self.errors = errors
        self.degraded = degraded
        self.degraded_seconds = degraded_seconds
        self.degraded_counted_until: float | None = None  # while degraded: counted up to when

    async def check(self, quotas: Sequence[Quota], identifiers: Sequence[str]) -> Verdict:
        if self.is_memory:  # cannot fail: no timeout, no breaker
            return await self._hit(quotas, identifiers)
        now = time.monotonic()
        self._count_degraded_time(now)
        if not self.breaker.allows_call(now):
            return self._degraded()
        try:
            async with asyncio.timeout(self.timeout):
                verdict = await self._hit(quotas, identifiers)
        except (TimeoutError, StorageError) as exc:
            self.errors.labels(type(exc).__name__).inc()
            if self.breaker.record_failure(now):
                self.degraded.set(1)
                self.degraded_counted_until = now
                logger.warning(
                    "rate-limit store failing; %s for %.0f s",
                    "admitting requests" if self.on_error == StoreErrorPolicy.open else "refusing limited requests",
                    self.breaker.open_seconds,
                    extra={"error": type(exc).__name__},
                )
            return self._degraded()
        if self.breaker.record_success():
            self._count_degraded_time(time.monotonic())
            self.degraded_counted_until = None
            self.degraded.set(0)
            logger.warning("rate-limit store recovered")
        return verdict

    def _count_degraded_time(self, now: float) -> None:
        if self.degraded_counted_until is not None:
            self.degraded_seconds.inc(max(0.0, now - self.degraded_counted_until))
            self.degraded_counted_until = now

    async def _hit(self, quotas: Sequence[Quota], identifiers: Sequence[str]) -> Verdict:
        windows = []
        for quota in quotas:
            admitted = await self.limiter.hit(quota.item, *identifiers)
            stats = await self.limiter.get_window_stats(quota.item, *identifiers)
            windows.append((quota, max(0, stats.remaining), stats.reset_time))
            if not admitted:
                return Verdict(False, "limited", tuple(windows))
        return Verdict(True, "allowed", tuple(windows))

    def _degraded(self) -> Verdict:
        if self.on_error == StoreErrorPolicy.open:
            return Verdict(True, "store_error_open")
        return Verdict(False, "store_error_closed")

    async def health(self) -> State:
        """`up`, or while failing `degraded` (admitting) or `down` (refusing)."""
        if self.is_memory:
            return "up"
        try:
            async with asyncio.timeout(max(self.timeout, 0.5)):
                healthy = bool(await self.storage.check())
        except (TimeoutError, StorageError):
            healthy = False
        if healthy and not self.breaker.is_open:
            return "up"
        return "degraded" if self.on_error == StoreErrorPolicy.open else "down"


class RateLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        store: LimitStore,
        routes: RouteTable[RoutePolicy],
        *,
        dry_run: bool,
        legacy_headers: bool,
        decisions: Counter,
    ) -> None:
        self.app = app
        self.store = store
        self.routes = routes
        self.dry_run = dry_run
        self.legacy_headers = legacy_headers
        self.decisions = decisions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or is_edge_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        route = self.routes.lookup(scope.get("method", "GET"), scope["path"])
        if not route.quotas:
            await self.app(scope, receive, send)
            return

        verdict = await self.store.check(route.quotas, _identifiers(scope, route))
        decision = f"dry_run_{verdict.decision}" if self.dry_run else verdict.decision
        scope[RATE_LIMIT_DECISION_SCOPE_KEY] = decision
        self.decisions.labels(route.label, decision).inc()
        if self.dry_run:
            if not verdict.allowed:
                logger.info("dry run: request would be refused", extra={"rate_limit": verdict.decision})
            await self.app(scope, receive, send)
            return

        headers = self._headers(verdict, route)
        if not verdict.allowed:
            await self._refuse(scope, receive, send, verdict, headers)
            return

        async def send_with_limits(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        await self.app(scope, receive, send_with_limits)

    def _headers(self, verdict: Verdict, route: RoutePolicy) -> Headers:
        headers: Headers = [route.policy_header]
        if not verdict.windows:  # the store could not be asked: the policy only
            return headers
        now = time.time()
        limits = ", ".join(
            f"{quota.field_name};r={remaining};t={_seconds_until(reset, now)}"
            for quota, remaining, reset in verdict.windows
        )
        headers.append((b"ratelimit", limits.encode()))
        if self.legacy_headers:
            quota, remaining, reset = min(verdict.windows, key=lambda window: window[1])
            headers += [
                (b"x-ratelimit-limit", str(quota.item.amount).encode()),
                (b"x-ratelimit-remaining", str(remaining).encode()),
                (b"x-ratelimit-reset", str(_seconds_until(reset, now)).encode()),
            ]
        return headers

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, verdict: Verdict, headers: Headers) -> None:
        if verdict.decision == "limited":
            _, _, reset = verdict.windows[-1]
            retry_after = max(1, _seconds_until(reset, time.time()))
            error = errors.rate_limited(retry_after)
        else:
            error = errors.RATE_LIMIT_UNAVAILABLE
            retry_after = 1
        headers = [*headers, (b"retry-after", str(retry_after).encode())]
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await errors.deny_websocket(scope, send, error, headers)
        else:
            await errors.send_error(scope, send, error, headers)


def build_route_policies(policy: Policy, default: str, key: Sequence[str]) -> RouteTable[RoutePolicy]:
    def for_rule(rule: RouteRule) -> RoutePolicy | None:
        if rule.rate_limit is None and rule.rate_limit_key is None:
            return None
        return RoutePolicy.build(rule.label, rule.rate_limit or default, rule.rate_limit_key or key)

    return RouteTable.from_policy(policy, RoutePolicy.build("default", default, key), for_rule)


def _identifiers(scope: Scope, route: RoutePolicy) -> list[str]:
    identifiers = [route.label]
    for part in route.key:
        if part == "client":
            client = scope.get("client")
            identifiers.append(client[0] if client else "unknown")
        elif part.startswith("header:"):  # normalised to lower case by the settings
            wanted = part[7:].encode("latin-1")
            identifiers.append(
                next((value.decode("latin-1") for name, value in scope["headers"] if name == wanted), "")
            )
    return identifiers


def _seconds_until(reset: float, now: float) -> int:
    return max(0, math.ceil(reset - now))


def _window(seconds: int) -> str:
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _sf_string(value: str) -> str:
    """An RFC 8941 structured-field String."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
