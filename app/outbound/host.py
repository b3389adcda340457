"""Everything the transport keeps per upstream authority (scheme, host, port): its policy,
breaker, bulkhead, retry budget and 429 block, created once and looked up per request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from time import monotonic

import httpx

from app.outbound.breaker import Breaker
from app.outbound.policy import HostPolicy
from app.outbound.retry import RetryBudget

DEFAULT_PORTS = {b"http": 80, b"https": 443}

HostKey = tuple[bytes, bytes, int | None]


def host_key(url: httpx.URL) -> HostKey:
    return (url.raw_scheme, url.raw_host, url.port)


@dataclass(eq=False)
class Host:
    authority: str  # "host:port", the name in logs, metrics and readiness
    address: str
    port: int
    policy_name: str
    policy: HostPolicy
    registered: bool  # bound by name, rather than met for the first time in a request
    breaker: Breaker
    bulkhead: asyncio.Semaphore
    retry_budget: RetryBudget
    blocked_until: float = 0.0  # monotonic instant a 429 asked us to wait for
    attributes: dict[str, str] = field(default_factory=dict)  # metric attributes naming the host

    @classmethod
    def create(cls, url: httpx.URL, policy_name: str, policy: HostPolicy, *, registered: bool) -> Host:
        address = url.host
        port = url.port or DEFAULT_PORTS.get(url.raw_scheme, 0)
        authority = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        return cls(
            authority=authority,
            address=address,
            port=port,
            policy_name=policy_name,
            policy=policy,
            registered=registered,
            breaker=Breaker(authority, policy),
            bulkhead=asyncio.Semaphore(policy.max_concurrency),
            retry_budget=RetryBudget(policy.retry_budget_ratio, policy.retry_budget_min),
            attributes={"outbound.authority": authority, "outbound.policy": policy_name},
        )

    def block_for(self, seconds: float) -> None:
        self.blocked_until = max(self.blocked_until, monotonic() + seconds)
