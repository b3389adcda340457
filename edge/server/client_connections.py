"""Open connections per client address, capped so that one address cannot take them all.

Counted by peer address: at accept time nothing else is known. Peers in
`EDGE_TRUSTED_PROXIES` are not capped - every client behind a load balancer shares its
address; the per-client cap on concurrent exchanges (`edge/concerns/client_concurrency.py`)
sees through them. See docs/proxy.md ("Slow clients").
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Sequence

from edge.server.metrics import SERVER_REFUSALS, TOO_MANY_CONNECTIONS
from edge.settings import IPNetwork

logger = logging.getLogger("edge.server")

# Under a flood one warning per interval, with the count, instead of one per connection.
WARN_INTERVAL_S = 10.0


class ClientConnections:
    def __init__(self, limit: int, trusted_proxies: Sequence[IPNetwork]) -> None:
        self.limit = limit
        self.trusted_proxies = tuple(trusted_proxies)
        self._open: dict[str, int] = {}
        self._refused_since_warning = 0
        self._warned_at = float("-inf")

    def admit(self, address: str) -> bool:
        """Counts a new connection from `address`, or says it is one too many."""
        count = self._open.get(address, 0)
        if count >= self.limit and not self._trusted(address):
            self._refused(address)
            return False
        self._open[address] = count + 1
        return True

    def release(self, address: str) -> None:
        count = self._open.pop(address, 0) - 1
        if count > 0:
            self._open[address] = count

    def _trusted(self, address: str) -> bool:
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(parsed in network for network in self.trusted_proxies)

    def _refused(self, address: str) -> None:
        SERVER_REFUSALS.labels(TOO_MANY_CONNECTIONS).inc()
        self._refused_since_warning += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_INTERVAL_S:
            logger.warning(
                "connections refused: more than %d open from one address",
                self.limit,
                extra={"client": address, "refused": self._refused_since_warning},
            )
            self._warned_at = now
            self._refused_since_warning = 0
