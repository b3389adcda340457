"""Everything the transport keeps per provider and upstream authority (scheme, host, port):
its policy, breaker, bulkhead, retry budget and 429 block, created once and looked up per
request. Two providers at one address (one simulator standing in for both) have a `Host`
each; a request that names no provider gets the authority's nameless one."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic

import httpx

from app.outbound.breaker import Breaker
from app.outbound.policy import HostPolicy
from app.outbound.retry import RetryBudget

DEFAULT_PORTS = {b"http": 80, b"https": 443}

# (provider name or None, scheme, host, port)
HostKey = tuple[str | None, bytes, bytes, int | None]


def host_key(name: str | None, url: httpx.URL) -> HostKey:
    return (name, url.raw_scheme, url.raw_host, url.port)


@dataclass(eq=False)
class Host:
    authority: str  # "host:port", in logs, metrics and spans (never in readiness)
    address: str
    port: int
    policy_name: str  # the provider's name, or `default` for a request that named none
    policy: HostPolicy
    breaker: Breaker
    bulkhead: asyncio.Semaphore
    retry_budget: RetryBudget
    blocked_until: float = 0.0  # monotonic instant a 429 asked us to wait for

    @classmethod
    def create(
        cls, url: httpx.URL, policy_name: str, policy: HostPolicy, on_moved: Callable[[str], None] | None = None
    ) -> Host:
        address = url.host
        port = url.port or DEFAULT_PORTS.get(url.raw_scheme, 0)
        authority = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        return cls(
            authority=authority,
            address=address,
            port=port,
            policy_name=policy_name,
            policy=policy,
            breaker=Breaker(policy_name, authority, policy, on_moved),
            bulkhead=asyncio.Semaphore(policy.max_concurrency),
            retry_budget=RetryBudget(policy.retry_budget_ratio, policy.retry_budget_min),
        )

    def block_for(self, seconds: float) -> None:
        self.blocked_until = max(self.blocked_until, monotonic() + seconds)
