"""What the edge's server sees that no application does: what it refuses before a request
reaches the application - a malformed or oversized head (400, 431, 501, 505), a head too
slow (408), one connection too many from an address - and the requests a drain finds
under way (docs/metrics.md#the-edge). A drain's counts are the process's last: the scrape
during the drain sees them, one after the process has exited cannot.

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

DRAIN_REQUESTS = Counter(
    "edge_drain_requests",
    "Requests under way when a drain began (in_flight): answered within it (completed) or cut at "
    "its end (cut, answered 503 shutting_down); pipelined ones left unread (dropped)",
    ["outcome"],
    registry=None,
)
