"""The server's configuration: uvicorn's `Config` plus the limits of the edge's protocol.

A subclass rather than globals, so that the limits travel with the configuration into
uvicorn's worker processes (which receive the `Config` pickled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import uvicorn

from edge.scope import Headers
from edge.server.client_connections import ClientConnections
from edge.server.protocol import EdgeHttpProtocol
from edge.server.websocket import EdgeWebSocketProtocol
from edge.settings import IPNetwork


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """docs/proxy.md, "Slow clients", says why each default is what it is."""

    header_timeout: float
    keep_alive_timeout: float
    body_timeout: float
    body_min_rate: int
    write_timeout: float
    max_head_bytes: int
    max_connections_per_client: int
    trusted_proxies: tuple[IPNetwork, ...]
    # On the protocol's own refusals (400, 408, 431, 501, 505): the security headers.
    refusal_headers: Headers


class EdgeServerConfig(uvicorn.Config):
    def __init__(self, app: Any, limits: ServerLimits, **options: Any) -> None:
        super().__init__(app, http=EdgeHttpProtocol, ws=EdgeWebSocketProtocol, **options)
        self.limits = limits
        self.clients = ClientConnections(limits.max_connections_per_client, limits.trusted_proxies)
