"""Where a server listens when its host setting is `::`: every address, IPv6 and IPv4.

asyncio (and so uvicorn) binds `::` with IPV6_V6ONLY set, so an IPv4 client - a health
check on 127.0.0.1, a Docker network - is refused. An IPv6-only private network
(Railway's older environments, docs/deployment.md) needs `::`; one dual-stack socket serves
both.
"""

from __future__ import annotations

import socket

ALL_ADDRESSES_V6 = "::"


def dual_stack_socket(port: int) -> socket.socket:
    """A listening TCP socket on every IPv6 and IPv4 address of `port`."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((ALL_ADDRESSES_V6, port))
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock
