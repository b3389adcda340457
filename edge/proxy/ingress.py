"""What arrives from the client, made trustworthy before any edge concern looks at it.

The outermost layer of the edge. It

- resolves the client through `EDGE_TRUSTED_PROXIES`: the client is the rightmost
  `X-Forwarded-For` hop that is not a trusted proxy, and forwarding headers from an
  untrusted peer are ignored, so a client can never choose its own address;
- drops hop-by-hop request headers, including those named in `Connection` (but never the
  forwarding headers or message framing), and the client's forwarding headers, which the
  proxy core re-issues from the resolved values;
- drops, from every peer, the non-standard client-address and URL-override headers
  (`X-Real-IP`, `X-Original-URL`...) and every header whose name has an underscore: CGI
  and WSGI servers read `X_Forwarded_For` as `X-Forwarded-For` (nginx and gunicorn drop
  these by default too).

Later layers read the resolved client from `scope["client"]` and the whole hop chain from
`scope[FORWARDED_SCOPE_KEY]`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from starlette.types import ASGIApp, Receive, Scope, Send

from edge.proxy.headers import CLIENT_CLAIMS, FORWARDING, REQUEST_HOP_BY_HOP, removable_fields
from edge.scope import FORWARDED_SCOPE_KEY, Headers
from edge.settings import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NEVER_FORWARDED = REQUEST_HOP_BY_HOP | CLIENT_CLAIMS


@dataclass(frozen=True, slots=True)
class ForwardedRequest:
    """The request's path to the edge: `chain` starts at the client, ends at the peer."""

    chain: tuple[str, ...]
    proto: str
    host: bytes | None
    peer_trusted: bool = False

    @property
    def client(self) -> str:
        return self.chain[0]

    def upstream_headers(self) -> Headers:
        """`X-Forwarded-*` and RFC 7239 `Forwarded`, describing this request."""
        proto = self.proto.encode("ascii")
        headers = [
            (b"x-forwarded-for", ", ".join(self.chain).encode("ascii")),
            (b"x-forwarded-proto", proto),
        ]
        first = b"for=" + _forwarded_node(self.chain[0]) + b";proto=" + proto
        if self.host is not None:
            headers.append((b"x-forwarded-host", self.host))
            first += b';host="' + self.host.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        elements = [first] + [b"for=" + _forwarded_node(hop) for hop in self.chain[1:]]
        headers.append((b"forwarded", b", ".join(elements)))
        return headers


def _forwarded_node(address: str) -> bytes:
    # RFC 7239 section 6: IPv6 addresses are bracketed and the value quoted.
    if ":" in address:
        return b'"[' + address.encode("ascii") + b']"'
    return address.encode("ascii")


def parse_hop(value: str) -> IPAddress | None:
    """One `X-Forwarded-For` entry: an address, possibly bracketed or with a port."""
    value = value.strip()
    if value.startswith("["):
        value = value[1 : value.find("]")] if "]" in value else ""
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


class TrustedProxies:
    def __init__(self, networks: Sequence[IPNetwork]) -> None:
        self.networks = tuple(networks)
        self.is_trusted = lru_cache(maxsize=4096)(self._is_trusted)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def _is_trusted(self, address: str) -> bool:
        parsed = parse_hop(address)
        return parsed is not None and any(parsed in network for network in self.networks)

    def client_chain(self, peer: str, forwarded_for: list[bytes]) -> tuple[str, ...]:
        """Walk `X-Forwarded-For` from the trusted peer leftwards while hops are trusted."""
        chain = [peer]
        hops = [hop for value in forwarded_for for hop in value.decode("latin-1").split(",")]
        for hop in reversed(hops):
            address = parse_hop(hop)
            if address is None:
                break  # an unreadable hop ends what can be believed
            chain.append(str(address))
            if not self.is_trusted(chain[-1]):
                break
        chain.reverse()
        return tuple(chain)


class IngressMiddleware:
    def __init__(self, app: ASGIApp, trusted_proxies: Sequence[IPNetwork]) -> None:
        self.app = app
        self.trusted = TrustedProxies(trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        headers: Headers = scope["headers"]
        removable = removable_fields(headers, NEVER_FORWARDED)
        kept: Headers = []
        forwarded_for: list[bytes] = []
        forwarded_proto = forwarded_host = host = None
        for name, value in headers:
            if name in FORWARDING:
                if name == b"x-forwarded-for":
                    forwarded_for.append(value)
                elif name == b"x-forwarded-proto":
                    forwarded_proto = value
                elif name == b"x-forwarded-host":
                    forwarded_host = value
            elif name not in removable and b"_" not in name:
                if name == b"host":
                    host = value
                kept.append((name, value))

        client = scope.get("client")
        peer = client[0] if client else "unknown"
        proto = "https" if scope["scheme"] in ("https", "wss") else "http"
        peer_trusted = bool(self.trusted) and self.trusted.is_trusted(peer)
        if peer_trusted:
            chain = self.trusted.client_chain(peer, forwarded_for)
            proto = _proto(forwarded_proto) or proto
            host = _first(forwarded_host) or host
            if chain[0] != peer:
                scope["client"] = (chain[0], 0)
        else:
            chain = (peer,)

        scope["headers"] = kept
        scope[FORWARDED_SCOPE_KEY] = ForwardedRequest(chain=chain, proto=proto, host=host, peer_trusted=peer_trusted)
        await self.app(scope, receive, send)


def _first(value: bytes | None) -> bytes | None:
    """The value set by the proxy nearest the client, when several appended theirs."""
    if value is None:
        return None
    return value.split(b",", 1)[0].strip() or None


def _proto(value: bytes | None) -> str | None:
    first = _first(value)
    return first.lower().decode("ascii") if first and first.lower() in (b"http", b"https") else None
