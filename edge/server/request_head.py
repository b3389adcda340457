"""The strict reading of a request head: one interpretation, or a refusal.

The HTTP parser (llhttp, through httptools) splits the bytes into a method, a target, a
version and header fields, and refuses broken syntax. What it lets through is judged here,
by RFC 9112 and RFC 9110, before any of it reaches the application:

- HTTP/1.0 and HTTP/1.1 only (505 otherwise); `CONNECT` is not proxied (501).
- The target is origin-form (`/path?query`), absolute-form whose authority is the `Host`,
  or `*` with `OPTIONS` only; no fragment, nothing but visible ASCII (400 otherwise).
- Exactly one valid `Host` (`host[:port]`) in HTTP/1.1; at most one in HTTP/1.0 (400).
- Body framing is `Content-Length` (one field, digits) or `Transfer-Encoding: chunked`
  alone, never both; `Transfer-Encoding` in HTTP/1.0 is refused (400), a transfer coding
  other than chunked is not implemented (501).

See docs/proxy.md ("Framing the edge can prove").
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal
from urllib.parse import unquote

from edge import errors
from edge.scope import Headers

BodyFraming = Literal["none", "length", "chunked"]

VERSIONS = ("1.0", "1.1")

# reg-name labels as DNS and container platforms use them (underscores included), or an
# IPv4 address, which has the same shape; IP literals are checked by `ipaddress`.
HOST_NAME = re.compile(rb"[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*\.?")
PORT = re.compile(rb"[0-9]{1,5}")
# The fields that decide how a request is framed, routed or upgraded.
FRAMING_AND_ROUTING = frozenset(
    {b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"expect"}
)
# Visible ASCII without `#` (a fragment is never part of a request target).
TARGET = re.compile(rb"[!-\"$-~]+")


class HeadRefused(Exception):
    """The head cannot be read one way only; `error` says how it is answered."""

    def __init__(self, error: errors.EdgeError) -> None:
        super().__init__(error.code)
        self.error = error


@dataclass(slots=True)  # not frozen: that costs a third of the time this module takes per request
class RequestHead:
    method: str
    http_version: str
    path: str
    raw_path: bytes
    query_string: bytes
    headers: Headers  # lower-cased names, values as received, in order
    framing: BodyFraming
    keep_alive: bool
    expect_continue: bool
    upgrade: bytes | None  # the protocol asked for with `Connection: upgrade`, lower-cased


@lru_cache(maxsize=1024)  # clients name the same few hosts again and again
def valid_host(value: bytes) -> bool:
    """`uri-host [":" port]` of RFC 3986, with the host a DNS-style name or an IP address."""
    if value.startswith(b"["):
        literal, bracket, port = value[1:].partition(b"]")
        if not bracket:
            return False
        try:
            ipaddress.IPv6Address(literal.decode("ascii"))
        except ValueError:
            return False
        return not port or (port.startswith(b":") and valid_port(port[1:]))
    name, colon, port = value.partition(b":")
    if colon and not valid_port(port):
        return False
    return len(name) <= 254 and HOST_NAME.fullmatch(name) is not None


def valid_port(value: bytes) -> bool:
    return PORT.fullmatch(value) is not None and int(value) <= 65535


def read_head(method: bytes, http_version: str, target: bytes, fields: Headers) -> RequestHead:
    """The request as the edge will forward it, or `HeadRefused`. `fields` have lower-case
    names, as ASGI has them."""
    if http_version not in VERSIONS:
        raise HeadRefused(errors.HTTP_VERSION_NOT_SUPPORTED)
    if method == b"CONNECT":
        raise HeadRefused(errors.CONNECT_NOT_IMPLEMENTED)

    hosts: list[bytes] = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    connection: list[bytes] = []
    upgrade: bytes | None = None
    expect_continue = False
    for name, value in fields:
        if name not in FRAMING_AND_ROUTING:
            continue  # most fields: one set lookup
        if name == b"host":
            hosts.append(value)
        elif name == b"content-length":
            lengths.append(value)
        elif name == b"transfer-encoding":
            # Empty list elements are refused, not skipped: `, chunked` is how a coding
            # is hidden from a component in front that reads the field another way.
            codings += [coding.strip().lower() for coding in value.split(b",")]
        elif name == b"connection":
            connection += [token.strip().lower() for token in value.split(b",")]
        elif name == b"upgrade":
            upgrade = value.strip().lower()
        else:
            expect_continue = value.strip().lower() == b"100-continue"

    if len(hosts) > 1 or (http_version == "1.1" and not hosts) or (hosts and not valid_host(hosts[0])):
        raise HeadRefused(errors.BAD_HOST)
    raw_path, query_string = _split_target(method, target, hosts[0] if hosts else None)

    framing: BodyFraming = "none"
    if codings:
        if (
            http_version == "1.0"
            or lengths
            or codings[-1] != b"chunked"
            or codings.count(b"chunked") > 1
            or b"" in codings
        ):
            raise HeadRefused(errors.BAD_FRAMING)
        if len(codings) > 1:
            raise HeadRefused(errors.TRANSFER_CODING_NOT_IMPLEMENTED)
        framing = "chunked"
    elif lengths:
        if len(lengths) > 1 or not lengths[0].isdigit():
            raise HeadRefused(errors.BAD_FRAMING)
        framing = "length" if int(lengths[0]) else "none"

    path = raw_path.decode("ascii")
    return RequestHead(
        method=method.decode("ascii"),
        http_version=http_version,
        path=unquote(path) if "%" in path else path,
        raw_path=raw_path,
        query_string=query_string,
        headers=fields,
        framing=framing,
        # HTTP/1.0 connections close after each response: no keep-alive negotiation.
        keep_alive=http_version == "1.1" and b"close" not in connection,
        expect_continue=expect_continue and framing != "none",
        upgrade=upgrade if b"upgrade" in connection else None,
    )


def _split_target(method: bytes, target: bytes, host: bytes | None) -> tuple[bytes, bytes]:
    """The path and query of an origin-form, absolute-form or asterisk-form target."""
    if TARGET.fullmatch(target) is None:
        raise HeadRefused(errors.BAD_TARGET)
    if target == b"*":
        if method != b"OPTIONS":
            raise HeadRefused(errors.BAD_TARGET)
        return b"*", b""
    if not target.startswith(b"/"):
        scheme, separator, rest = target.partition(b"://")
        if not separator or scheme.lower() not in (b"http", b"https"):
            raise HeadRefused(errors.BAD_TARGET)
        authority_end = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
        authority, target = rest[:authority_end], rest[authority_end:]
        # One authority for the request: a target naming another host than `Host` is read
        # differently by a component that routes on either (RFC 9112 section 3.2.2).
        if host is None or authority.lower() != host.lower() or not valid_host(authority):
            raise HeadRefused(errors.BAD_HOST)
        if not target.startswith(b"/"):
            target = b"/" + target
    path, _, query = target.partition(b"?")
    return path, query
