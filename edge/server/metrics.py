"""What the edge's server refuses before a request reaches the application: a malformed or
oversized head (400, 431, 501, 505), a head or body too slow (408), one connection too
many from an address (docs/metrics.md#the-edge).

Per process, not per application: the server has none to hand them to, and uvicorn spawns
its workers from a pickled configuration, which cannot carry a counter. A worker's counts
reach the supervisor's scrape through prometheus-client's files like every other series;
with one process, edge/server/serve.py registers the counter with the served registry.
"""

from __future__ import annotations

from prometheus_client import Counter

SERVER_REFUSALS = Counter(
    "edge_server_refusals",
    "Requests and connections the server refused before the application saw them, by code",
    ["code"],
    registry=None,
)
TOO_MANY_CONNECTIONS = "too_many_connections"
