"""What the edge's layers share through the ASGI scope, defined once and depending on
nothing else in `edge`: the header list, the keys under which one layer leaves something
for another, and the path of the edge's own endpoints (docs/edge.md).
"""

from __future__ import annotations

# Raw `(name, value)` byte pairs, never a mapping, so repeated fields (several
# `Set-Cookie`) keep their number and order.
Headers = list[tuple[bytes, bytes]]

# The edge's own endpoints (`/_edge/live`, `/_edge/ready`): answered by the edge, never
# forwarded, never limited; everything else under the prefix is a 404.
EDGE_PATH = "/_edge"

# Set by the ingress layer: the request's `ForwardedRequest` (resolved client, scheme, host).
FORWARDED_SCOPE_KEY = "edge.forwarded"

# Set by the proxy core: the upstream's status; absent when the edge answered itself.
UPSTREAM_STATUS_SCOPE_KEY = "edge.upstream_status"

# Set by the rate limiter: its decision (`allowed`, `limited`, ...), for the access log.
RATE_LIMIT_DECISION_SCOPE_KEY = "edge.rate_limit"

# Set by edge/errors.py: the code of the error the edge answered itself, for the metrics.
EDGE_ERROR_SCOPE_KEY = "edge.error"

# Set by the server under `scope["extensions"]`: how large the client's own head was, before
# any layer added or removed fields (`{"fields": n, "bytes": n}`); the size limits count it.
CLIENT_HEAD_EXTENSION = "edge.client_head"

# The ASGI extension that lets a WebSocket upgrade be refused with an HTTP response.
WEBSOCKET_DENIAL_EXTENSION = "websocket.http.response"


def is_edge_path(path: str) -> bool:
    """Whether the (decoded) path is the edge's own: `/_edge` or below it."""
    return path == EDGE_PATH or path.startswith(EDGE_PATH + "/")
