"""The servers the proxy benchmark measures, its contenders (docs/benchmarks.md, "What is
measured"): their names, the settings each runs with, and the tiny upstream behind them."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.proxy.nginx import nginx_argv
from bench.proxy.procfs import process_group_cpu_seconds
from bench.proxy.redis_store import RedisStore
from bench.support import BENCH_DIR, GIB, Service, clean_env, free_port

DIRECT, EDGE, NGINX, NAIVE = "upstream direct", "edge", "nginx", "naive"
EDGE_ALL_MEMORY = "edge, all concerns, memory store"
EDGE_ALL_REDIS = "edge, all concerns, Redis store"
NGINX_EQUIVALENT = "nginx, equivalent configuration"
CONCERN_CONTENDERS = (EDGE_ALL_MEMORY, EDGE_ALL_REDIS, NGINX_EQUIVALENT)
NAME_WIDTH = max(len(name) for name in (DIRECT, *CONCERN_CONTENDERS))

# Sent by wrk to every contender, so the CORS layer has work to do where it is configured.
ORIGIN = "https://app.example.com"
# wrk's requests must all pass: the per-second window keeps the moving window small.
GENEROUS_RATE_LIMIT = "1000000/second"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
UNLIMITED_BODY_BYTES = 1024 * GIB  # the plain edge's body limit: none that matters
# A load generator is one client address with many connections and requests in flight:
# the per-client caps (64 connections, 16 exchanges) exist to refuse exactly that, so for a
# benchmark they are raised out of the way, like the rate limit (docs/benchmarks.md).
LOAD_GENERATOR_CAPS = {"EDGE_MAX_CONNECTIONS_PER_CLIENT": "10000", "EDGE_MAX_EXCHANGES_PER_CLIENT": "10000"}


@dataclass
class Server(Service):
    """A server wrk measures: ready when `GET /` answers `ok` (through the upstream, for the proxies)."""

    ready_body: bytes | None = b"ok"
    access_log: Path | None = None  # where its access log goes, when it writes one
    # CPU seconds spent for it outside its own processes so far (Redis, for the Redis store).
    extra_cpu: Callable[[], float] | None = None
    extra_cpu_name: str = ""
    requests_sent: int = 0  # by wrk, warm-ups included

    def cpu_seconds(self) -> float:
        return process_group_cpu_seconds(self.pid)


def bench_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without any edge setting of the caller's, plus `extra`."""
    return clean_env(("EDGE_",), extra)


def edge_env(upstream_url: str, port: int, extra: dict[str, str]) -> dict[str, str]:
    return bench_env(
        {
            "EDGE_UPSTREAM_URL": upstream_url,
            "EDGE_HOST": "127.0.0.1",
            "EDGE_PORT": str(port),
            "EDGE_WORKERS": "1",
            **LOAD_GENERATOR_CAPS,
            **extra,
        }
    )


def nginx_server(
    name: str, nginx: str, tmp: Path, template: str, stem: str, upstream_port: int, access_log: Path | None = None
) -> Server:
    port = free_port()
    return Server(
        name,
        nginx_argv(nginx, template, tmp, stem, port, upstream_port, ORIGIN),
        port,
        tmp / f"{stem}.log",
        env=bench_env({}),
        access_log=access_log,
    )


def build_contenders(
    tmp: Path,
    nginx: str | None,
    big_bytes: int,
    concerns: bool,
    redis_store: RedisStore | None,
) -> dict[str, Server]:
    python = sys.executable
    upstream_port = free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    servers = {
        DIRECT: Server(
            DIRECT,
            [
                python,
                str(BENCH_DIR / "tiny_upstream.py"),
                "--port",
                str(upstream_port),
                "--big-bytes",
                str(big_bytes),
            ],
            upstream_port,
            tmp / "upstream.log",
            env=bench_env({}),
        )
    }
    edge_port = free_port()
    # The plain edge as measured before the concerns were on by default: no rate limiting,
    # no access log, and no body limit of its own (like the plain nginx's
    # `client_max_body_size 0`), so the 1 GiB upload of the memory test goes through.
    servers[EDGE] = Server(
        EDGE,
        [python, "-m", "edge"],
        edge_port,
        tmp / "edge.log",
        env=edge_env(
            upstream_url,
            edge_port,
            {
                "EDGE_LOG_LEVEL": "warning",
                "EDGE_ACCESS_LOG": "false",
                "EDGE_RATE_LIMIT_DEFAULT": "off",
                "EDGE_MAX_BODY_BYTES": str(max(big_bytes, UNLIMITED_BODY_BYTES)),
            },
        ),
    )
    if nginx is not None:
        servers[NGINX] = nginx_server(NGINX, nginx, tmp, "nginx.conf.template", "nginx", upstream_port)
    naive_port = free_port()
    servers[NAIVE] = Server(
        NAIVE,
        [python, str(BENCH_DIR / "naive_proxy.py"), "--port", str(naive_port), "--upstream", upstream_url],
        naive_port,
        tmp / "naive.log",
        env=bench_env({}),
    )
    if not concerns:
        return servers
    # Every concern on, with its defaults, except: a rate limit wrk never reaches, an
    # allowed CORS origin, and the access log at info written to a file (stdout).
    all_concerns = {
        "EDGE_RATE_LIMIT_DEFAULT": GENEROUS_RATE_LIMIT,
        "EDGE_CORS_ALLOW_ORIGINS": ORIGIN,
        "EDGE_LOG_LEVEL": "info",
        "EDGE_ACCESS_LOG": "true",
    }
    port = free_port()
    servers[EDGE_ALL_MEMORY] = Server(
        EDGE_ALL_MEMORY,
        [python, "-m", "edge"],
        port,
        tmp / "edge-all-memory.access.log",
        env=edge_env(upstream_url, port, all_concerns),
        access_log=tmp / "edge-all-memory.access.log",
    )
    if redis_store is not None:
        port = free_port()
        servers[EDGE_ALL_REDIS] = Server(
            EDGE_ALL_REDIS,
            [python, "-m", "edge"],
            port,
            tmp / "edge-all-redis.access.log",
            env=edge_env(
                upstream_url,
                port,
                {
                    **all_concerns,
                    "EDGE_RATE_LIMIT_STORAGE_URL": redis_store.url,
                    "EDGE_RATE_LIMIT_KEY_PREFIX": redis_store.prefix,
                },
            ),
            access_log=tmp / "edge-all-redis.access.log",
            extra_cpu=redis_store.cpu_seconds,
            extra_cpu_name="Redis",
        )
    if nginx is not None:
        servers[NGINX_EQUIVALENT] = nginx_server(
            NGINX_EQUIVALENT,
            nginx,
            tmp,
            "nginx-concerns.conf.template",
            "nginx-concerns",
            upstream_port,
            access_log=tmp / "nginx-concerns.access.log",
        )
    return servers
