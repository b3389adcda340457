"""What the concern contenders must do besides answering: send the concerns' headers (checked
before any load, or the run stops) and log every request (counted at the end)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from bench.proxy.contenders import CONCERN_CONTENDERS, EDGE_ALL_MEMORY, NGINX_EQUIVALENT, ORIGIN, Server
from bench.support import MIB, BenchError, log

# What a response with `Origin: ORIGIN` must carry from every concern contender.
CONCERN_HEADERS = (
    "x-request-id",
    "vary",
    "access-control-allow-origin",
    "access-control-expose-headers",
    "strict-transport-security",
    "content-security-policy",
    "x-content-type-options",
    "x-frame-options",
    "referrer-policy",
    "permissions-policy",
    "cross-origin-opener-policy",
    "cross-origin-resource-policy",
)


def response_headers(server: Server) -> dict[str, str]:
    """The headers of `GET /` with the `Origin` wrk sends, names lower-cased."""
    with httpx.Client(timeout=5.0) as client:
        response = client.get(server.url + "/", headers={"origin": ORIGIN})
    if response.status_code != 200:
        raise BenchError(f"{server.name}: GET / with Origin answered {response.status_code}")
    return {name.lower(): value for name, value in response.headers.items()}


def check_concern_headers(servers: dict[str, Server]) -> dict[str, Any]:
    """Every concern contender must send the concerns' headers; reports where they differ."""
    seen = {name: response_headers(servers[name]) for name in CONCERN_CONTENDERS if name in servers}
    for name, headers in seen.items():
        missing = [header for header in CONCERN_HEADERS if header not in headers]
        if missing or headers.get("access-control-allow-origin") != ORIGIN:
            raise BenchError(f"{name} does not do the concerns' work: missing {', '.join(missing) or 'CORS'}")
    log("headers: every concern target sends " + ", ".join(CONCERN_HEADERS))
    result: dict[str, Any] = {"checked": list(CONCERN_HEADERS), "by_target": seen}
    edge_headers, nginx_headers = seen.get(EDGE_ALL_MEMORY), seen.get(NGINX_EQUIVALENT)
    if edge_headers is not None and nginx_headers is not None:
        result["only_edge"] = sorted(edge_headers.keys() - nginx_headers.keys())
        result["only_nginx"] = sorted(nginx_headers.keys() - edge_headers.keys())
        result["different_values"] = sorted(
            name
            for name in edge_headers.keys() & nginx_headers.keys()
            if edge_headers[name] != nginx_headers[name] and name not in ("date", "x-request-id")
        )
        log(
            f"headers: only the edge sends {', '.join(result['only_edge']) or 'nothing more'}; "
            f"only nginx sends {', '.join(result['only_nginx']) or 'nothing more'}; "
            f"values differ for {', '.join(result['different_values']) or 'none'}"
        )
    return result


@dataclass
class AccessLog:
    target: str
    lines: int
    size_mib: float
    requests_sent: int  # by wrk, warm-ups included; the readiness checks come on top


def access_log_summary(server: Server) -> AccessLog | None:
    """How many access-log lines the contender wrote, against the requests wrk completed."""
    if server.access_log is None or not server.access_log.exists():
        return None
    lines = 0
    with server.access_log.open("rb") as log_file:
        for line in log_file:
            if b'"logger":"edge.access"' in line or b'"logger": "edge.access"' in line:
                lines += 1
    return AccessLog(server.name, lines, server.access_log.stat().st_size / MIB, server.requests_sent)
