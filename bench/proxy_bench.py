"""The edge's benchmark: throughput, added latency and memory, against nginx and a naive proxy.

Everything runs in one invocation on the same machine, so the ratios between contenders
mean something even when the absolute numbers drift (shared, noisy 2-core hosts):

1. starts the tiny upstream (bench/tiny_upstream.py), the edge (`python -m edge`, one
   worker, rate limiting and access log off), nginx (bench/nginx.conf.template; skipped
   when not installed), the naive proxy (bench/naive_proxy.py) and, unless
   `--skip-concerns`, the edge with every concern on (rate limiting in memory, and in
   Redis when it answers) and nginx configured to do the same work
   (bench/nginx-concerns.conf.template), on free loopback ports, and always stops them;
2. checks that the concern targets send the headers they should (request id, CORS,
   security headers) for a request with `Origin`;
3. memory: streams a 1 GiB upload and a 1 GiB download through the plain edge while
   sampling its RSS, and checks the byte counts;
4. throughput: `wrk -t1 -c50 -d<N>s --latency -H "Origin: ..."` against every target, in
   interleaved (rotated) rounds; at `-c1` the same for every target but the naive proxy;
   the median per target over the rounds is reported;
5. prints the table, the ratios and the targets (PASS/FAIL); `--json PATH` also writes
   everything, per-round numbers included, as JSON. The exit status is 0 whatever the
   verdicts; 2 means the benchmark itself could not run. The Redis keys of the run (a
   unique prefix) are deleted at the end.

Each step is a module of bench/proxy/ (the contenders, nginx, Redis, memory, the checks,
wrk, the targets, the report); this script parses the options and runs them in order.

Run: `make bench` or `.venv/bin/python bench/proxy_bench.py [--rounds 3 --duration 5 ...]`.
Results are described in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.proxy.checks import access_log_summary, check_concern_headers
from bench.proxy.contenders import (
    CONCERN_CONTENDERS,
    DEFAULT_REDIS_URL,
    DIRECT,
    EDGE,
    EDGE_ALL_REDIS,
    NGINX,
    NGINX_EQUIVALENT,
    Server,
    build_contenders,
)
from bench.proxy.memory import measure_memory
from bench.proxy.nginx import find_nginx
from bench.proxy.redis_store import RedisStore
from bench.proxy.report import build_report, format_report, machine_info
from bench.proxy.targets import TARGETS, Measurements
from bench.proxy.wrk import measure_throughput
from bench.support import GIB, log, run_benchmark


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the edge against upstream direct, nginx and a naive Python proxy, "
        "plain and with every concern on.",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement (3)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run at -c N (5)")
    parser.add_argument("--latency-duration", type=int, default=5, help="seconds per wrk run at -c1 (5)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections for throughput (50)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of untimed wrk per target first (2)")
    parser.add_argument("--memory-bytes", type=int, default=GIB, help="bytes streamed each way (1 GiB)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the upload/download memory test")
    parser.add_argument("--no-nginx", action="store_true", help="leave nginx out even when installed")
    parser.add_argument(
        "--skip-concerns",
        action="store_true",
        help="leave out the edge with all concerns (memory and Redis store) and nginx's equivalent",
    )
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help=f"Redis for the Redis-store edge ({DEFAULT_REDIS_URL}); only keys of this run are touched",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, server logs)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration < 1 or args.latency_duration < 1 or args.connections < 1:
        parser.error("--rounds, --duration, --latency-duration and --connections must be >= 1")
    if not args.redis_url.startswith(("redis://", "rediss://")):
        parser.error("--redis-url must be a redis:// or rediss:// URL")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        print("proxy_bench: wrk is not installed (make bench installs it)", file=sys.stderr)
        return 2
    return run_benchmark(
        "proxy_bench",
        lambda tmp, cleanup: run(args, wrk, tmp, cleanup),
        json_path=args.json,
        keep_tmp=args.keep_tmp,
        errors=(httpx.HTTPError,),
    )


def run(args: argparse.Namespace, wrk: str, tmp: Path, cleanup: contextlib.ExitStack) -> tuple[dict[str, Any], int]:
    notes: list[str] = []
    left_out: dict[str, str] = {}  # why, for each contender not measured
    nginx = None if args.no_nginx else find_nginx()
    if nginx is None:
        notes.append("nginx not run (not installed or --no-nginx): the targets against nginx are skipped")
        log("nginx is not installed: measuring without it")
        left_out.update(dict.fromkeys((NGINX, NGINX_EQUIVALENT), "nginx not installed or --no-nginx"))
    redis_store = None
    if args.skip_concerns:
        left_out.update(dict.fromkeys(CONCERN_CONTENDERS, "--skip-concerns"))
    else:
        redis_store = connect_redis(args.redis_url, cleanup, notes)
        if redis_store is None:
            left_out[EDGE_ALL_REDIS] = "Redis not reachable"

    tmp.chmod(0o755)  # nginx's worker may run as another user
    servers = build_contenders(tmp, nginx, args.memory_bytes, not args.skip_concerns, redis_store)
    started = start(servers, cleanup)
    log("servers: " + ", ".join(f"{s.name} on :{s.port} (pid {s.pid})" for s in started))

    machine = machine_info(wrk, nginx)
    headers = None if args.skip_concerns else check_concern_headers(servers)
    memory = None if args.skip_memory else measure_memory(servers[EDGE], args.memory_bytes)
    loaded, single = measure_throughput(wrk, servers, args)
    for server in started:
        if server.proc is not None and server.proc.poll() is not None:
            notes.append(f"{server.name} exited during the run; see its log")
    access_logs = [entry for entry in map(access_log_summary, servers.values()) if entry is not None]
    for entry in access_logs:
        if entry.lines < entry.requests_sent:
            notes.append(
                f"{entry.target} logged {entry.lines:,} requests of {entry.requests_sent:,}: "
                "its access log is incomplete"
            )
    measured = Measurements(loaded, single, memory, args.connections, args.memory_bytes, left_out)
    outcomes = [target.judge(measured) for target in TARGETS]
    report = build_report(args, machine, measured, outcomes, headers, access_logs, notes)
    print(format_report(report, measured, outcomes), flush=True)
    return report, 0


def connect_redis(url: str, cleanup: contextlib.ExitStack, notes: list[str]) -> RedisStore | None:
    """The Redis store when it answers (its keys deleted when the run ends), else None and a note."""
    store = RedisStore(url)
    why_not = store.ping()
    if why_not is not None:
        notes.append(f"Redis at {url} not reachable ({why_not}): the Redis-store edge is skipped")
        log(f"Redis is not reachable ({why_not}): measuring without the Redis-store edge")
        store.close()
        return None
    log(f"Redis store: {url}, key prefix {store.prefix}")
    cleanup.callback(store.clean_up)  # registered first, so it runs once the edges have stopped
    return store


def start(servers: dict[str, Server], cleanup: contextlib.ExitStack) -> list[Server]:
    """The upstream first, then every proxy in front of it; each stopped when the run ends."""
    upstream = servers[DIRECT]
    upstream.start()
    cleanup.callback(upstream.stop)
    upstream.wait_ready()
    proxies = [server for name, server in servers.items() if name != DIRECT]
    for server in proxies:
        server.start()
        cleanup.callback(server.stop)
    for server in proxies:
        server.wait_ready()
    return [upstream, *proxies]


if __name__ == "__main__":
    sys.exit(main())
