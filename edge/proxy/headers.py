"""Header hygiene shared by the request and response directions."""

from __future__ import annotations

from edge.scope import Headers

# RFC 9110 section 7.6.1, plus the legacy fields of RFC 2616 that are also meant for the
# next hop only (`Proxy-Authorization` carries credentials for a proxy, not the app).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)


# Framing stays in the request until the forwarder, which re-frames the body upstream.
REQUEST_HOP_BY_HOP = HOP_BY_HOP - {b"transfer-encoding"}

# Like nginx, the edge's server sets its own `Date`; the upstream's would be a duplicate.
RESPONSE_HOP_BY_HOP = HOP_BY_HOP | {b"date"}

# The edge re-issues these for every request; the client's copies are never forwarded.
FORWARDING = frozenset({b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})

# Non-standard spellings of a client address, scheme, host, port, prefix or URL, which some
# frameworks and CDNs believe. The edge re-issues only the standard forwarding headers, so
# these are dropped from every peer, trusted proxies included: an app that trusts one would
# otherwise let a client pick its own address or route.
CLIENT_CLAIMS = frozenset(
    {
        b"x-real-ip",
        b"true-client-ip",
        b"x-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-cluster-client-ip",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-server",
        b"x-forwarded-scheme",
        b"x-original-url",
        b"x-rewrite-url",
        b"x-original-host",
        b"x-host",
    }
)

# A `Connection` header may name extra hop-by-hop fields, but it must never be able to
# remove message framing or the forwarding headers (GHSA-62c8-mh53-4cqv in Traefik).
PROTECTED_FROM_CONNECTION = FORWARDING | {b"host", b"content-length", b"transfer-encoding"}


def connection_tokens(headers: Headers) -> set[bytes]:
    """The field names listed in every `Connection` header, lower-cased."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
    tokens.discard(b"")
    return tokens


def removable_fields(headers: Headers, fixed: frozenset[bytes]) -> frozenset[bytes]:
    """The `fixed` hop-by-hop fields plus whatever `Connection` names, minus protected ones."""
    named = connection_tokens(headers)
    if not named:
        return fixed
    return fixed | (named - PROTECTED_FROM_CONNECTION)
