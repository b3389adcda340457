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

Run: `make bench` or `.venv/bin/python bench/proxy_bench.py [--rounds 3 --duration 5 ...]`.
Results are described in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.support import ROOT, BenchError, Service, clean_env, free_port, interrupt_on_signals, log, machine

BENCH_DIR = Path(__file__).resolve().parent
MIB = 1024 * 1024
GIB = 1024 * MIB
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# The targets the edge is held to.
TARGET_EDGE_OVER_NGINX = 0.12  # edge req/s >= 12 % of nginx's at c=50
TARGET_ADDED_LATENCY_MS = 0.35  # edge median latency at c=1 minus upstream direct
TARGET_RSS_GROWTH_MIB = 32.0  # peak RSS growth while streaming 1 GiB either way
TARGET_EDGE_ALL_MEMORY_OVER_NGINX_EQ = 0.10  # all concerns, memory store, vs nginx equivalent
TARGET_EDGE_ALL_REDIS_OVER_NGINX_EQ = 0.06  # all concerns, Redis store, vs nginx equivalent

DIRECT, EDGE, NGINX, NAIVE = "upstream direct", "edge", "nginx", "naive"
EDGE_ALL_MEMORY = "edge, all concerns, memory store"
EDGE_ALL_REDIS = "edge, all concerns, Redis store"
NGINX_EQUIVALENT = "nginx, equivalent configuration"
CONCERN_TARGETS = (EDGE_ALL_MEMORY, EDGE_ALL_REDIS, NGINX_EQUIVALENT)
NAME_WIDTH = max(len(name) for name in (DIRECT, *CONCERN_TARGETS))

# Sent by wrk to every target, so the CORS layer has work to do where it is configured.
ORIGIN = "https://app.example.com"
# wrk's requests must all pass: the per-second window keeps the moving window small.
GENEROUS_RATE_LIMIT = "1000000/second"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
UNLIMITED_BODY_BYTES = 1024 * GIB  # the plain edge's body limit: none that matters
# What a response with `Origin: ORIGIN` must carry from every concern target.
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


# -- processes ------------------------------------------------------------------------------


def process_group_cpu_seconds(pgid: int) -> float:
    """User + system CPU of every live process in a process group (a service and its workers)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name: state ppid pgrp ... utime(index 11) stime(index 12).
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")


@dataclass
class Target(Service):
    """A server wrk measures: ready when `GET /` answers `ok` (through the upstream, for the proxies)."""

    ready_body: bytes | None = b"ok"
    access_log: Path | None = None  # where its access log goes, when it writes one
    # CPU seconds spent for it outside its own processes so far (Redis, for the Redis store).
    extra_cpu: Callable[[], float] | None = None
    extra_cpu_name: str = ""
    requests_sent: int = 0  # by wrk, warm-ups included

    def cpu_seconds(self) -> float:
        return process_group_cpu_seconds(self.pid)


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def bench_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without any edge setting of the caller's, plus `extra`."""
    return clean_env(("EDGE_",), extra)


# A load generator is one client address with many connections and requests in flight:
# the per-client caps (64 connections, 16 exchanges) exist to refuse exactly that, so for a
# benchmark they are raised out of the way, like the rate limit (docs/benchmarks.md).
LOAD_GENERATOR_CAPS = {"EDGE_MAX_CONNECTIONS_PER_CLIENT": "10000", "EDGE_MAX_EXCHANGES_PER_CLIENT": "10000"}


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


def nginx_service(name: str, nginx: str, tmp: Path, template: str, stem: str, upstream_port: int) -> Target:
    port = free_port()
    config = (
        (BENCH_DIR / template)
        .read_text()
        .replace("@@TMP_DIR@@", str(tmp))
        .replace("@@LISTEN_PORT@@", str(port))
        .replace("@@UPSTREAM_PORT@@", str(upstream_port))
        .replace("@@ALLOWED_ORIGIN_REGEX@@", re.escape(ORIGIN))
    )
    (tmp / f"{stem}.conf").write_text(config)
    return Target(
        name,
        [nginx, "-p", str(tmp), "-e", str(tmp / f"{stem}.error.log"), "-c", str(tmp / f"{stem}.conf")],
        port,
        tmp / f"{stem}.log",
        env=bench_env({}),
    )


def build_services(
    tmp: Path,
    nginx: str | None,
    big_bytes: int,
    concerns: bool,
    redis_store: RedisStore | None,
) -> dict[str, Target]:
    python = sys.executable
    upstream_port = free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    services = {
        DIRECT: Target(
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
    services[EDGE] = Target(
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
        services[NGINX] = nginx_service(NGINX, nginx, tmp, "nginx.conf.template", "nginx", upstream_port)
    naive_port = free_port()
    services[NAIVE] = Target(
        NAIVE,
        [python, str(BENCH_DIR / "naive_proxy.py"), "--port", str(naive_port), "--upstream", upstream_url],
        naive_port,
        tmp / "naive.log",
        env=bench_env({}),
    )
    if not concerns:
        return services
    # Every concern on, with its defaults, except: a rate limit wrk never reaches, an
    # allowed CORS origin, and the access log at info written to a file (stdout).
    all_concerns = {
        "EDGE_RATE_LIMIT_DEFAULT": GENEROUS_RATE_LIMIT,
        "EDGE_CORS_ALLOW_ORIGINS": ORIGIN,
        "EDGE_LOG_LEVEL": "info",
        "EDGE_ACCESS_LOG": "true",
    }
    port = free_port()
    services[EDGE_ALL_MEMORY] = Target(
        EDGE_ALL_MEMORY,
        [python, "-m", "edge"],
        port,
        tmp / "edge-all-memory.access.log",
        env=edge_env(upstream_url, port, all_concerns),
        access_log=tmp / "edge-all-memory.access.log",
    )
    if redis_store is not None:
        port = free_port()
        services[EDGE_ALL_REDIS] = Target(
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
        services[NGINX_EQUIVALENT] = nginx_service(
            NGINX_EQUIVALENT, nginx, tmp, "nginx-concerns.conf.template", "nginx-concerns", upstream_port
        )
        services[NGINX_EQUIVALENT].access_log = tmp / "nginx-concerns.access.log"
    return services


# -- Redis -----------------------------------------------------------------------------------


class RedisStore:
    """The Redis the Redis-store edge counts in, under a key prefix of this run only."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"edge-bench-{os.getpid()}-{secrets.token_hex(4)}"
        self.client = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)

    def ping(self) -> str | None:
        """None when Redis answers, else why not."""
        try:
            self.client.ping()
        except redis.RedisError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def cpu_seconds(self) -> float:
        """The Redis server's user + system CPU (every client's work, not only the edge's)."""
        info = self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def delete_keys(self) -> int:
        """SCAN + DEL of this run's prefix only (never FLUSHDB: the Redis is shared)."""
        deleted = 0
        batch: list[bytes] = []
        for key in self.client.scan_iter(match=f"{self.prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += int(self.client.delete(*batch))
                batch.clear()
        if batch:
            deleted += int(self.client.delete(*batch))
        return deleted

    def close(self) -> None:
        self.client.close()


# -- wrk -------------------------------------------------------------------------------------

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_PERCENTILE = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_REQUESTS = re.compile(r"^\s*(\d+) requests in ", re.MULTILINE)
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


@dataclass
class WrkResult:
    requests_per_sec: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    socket_errors: int
    non_2xx: int
    cpu_us_per_request: float | None = None  # CPU of the measured server's processes
    extra_cpu_us_per_request: float | None = None  # CPU spent for it elsewhere (Redis)


def parse_wrk(output: str) -> WrkResult:
    rps = _RPS.search(output)
    requests = _REQUESTS.search(output)
    percentiles = {m[1]: float(m[2]) * _UNIT_MS[m[3]] for m in _PERCENTILE.finditer(output)}
    if rps is None or requests is None or not {"50", "90", "99"} <= percentiles.keys():
        raise BenchError(f"cannot read wrk's output:\n{output}")
    errors = _SOCKET_ERRORS.search(output)
    non_2xx = _NON_2XX.search(output)
    return WrkResult(
        requests_per_sec=float(rps[1]),
        p50_ms=percentiles["50"],
        p90_ms=percentiles["90"],
        p99_ms=percentiles["99"],
        requests=int(requests[1]),
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
    )


def wrk_argv(wrk: str, url: str, connections: int, duration: int) -> list[str]:
    return [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        "-H",
        f"Origin: {ORIGIN}",
        url + "/",
    ]


def run_wrk(wrk: str, service: Target, connections: int, duration: int) -> WrkResult:
    argv = wrk_argv(wrk, service.url, connections, duration)
    extra_before = service.extra_cpu() if service.extra_cpu else 0.0
    cpu_before = service.cpu_seconds()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    cpu_used = service.cpu_seconds() - cpu_before
    extra_used = service.extra_cpu() - extra_before if service.extra_cpu else None
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    result = parse_wrk(done.stdout)
    service.requests_sent += result.requests
    if result.requests:
        result.cpu_us_per_request = cpu_used / result.requests * 1e6
        if extra_used is not None:
            result.extra_cpu_us_per_request = extra_used / result.requests * 1e6
    return result


# -- memory ----------------------------------------------------------------------------------


class RssSampler:
    """Samples a process's VmRSS every `interval` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.samples = 0
        self._peak_kib = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> int:
        value = rss_kib(self.pid)
        with self._lock:
            self.samples += 1
            self._peak_kib = max(self._peak_kib, value)
        return value

    def take_peak(self) -> int:
        """The peak since the last call (or since the start), and start a new period."""
        self.sample()
        with self._lock:
            peak, self._peak_kib = self._peak_kib, 0
        return peak


def idle_rss_kib(pid: int, seconds: float = 1.0) -> int:
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples.append(rss_kib(pid))
        time.sleep(0.05)
    return int(statistics.median(samples))


def repeated(chunk: bytes, size: int) -> Iterator[bytes]:
    """`size` bytes as the same chunk over and over: nothing accumulates in the client."""
    left = size
    while left >= len(chunk):
        yield chunk
        left -= len(chunk)
    if left:
        yield chunk[:left]


@dataclass
class Transfer:
    direction: str
    expected_bytes: int
    counted_bytes: int
    seconds: float
    peak_rss_mib: float
    growth_mib: float
    status: int = 200

    @property
    def bytes_ok(self) -> bool:
        return self.status == 200 and self.counted_bytes == self.expected_bytes


@dataclass
class MemoryResult:
    baseline_rss_mib: float
    transfers: list[Transfer] = field(default_factory=list)
    samples: int = 0


def measure_memory(edge: Target, size: int, log: Callable[[str], None]) -> MemoryResult:
    """Streams `size` bytes up to `/upload` and down from `/big` through the edge."""
    pid = edge.pid
    timeout = httpx.Timeout(600.0, connect=10.0)
    with httpx.Client(timeout=timeout) as client:
        for _ in range(20):  # warm the path up: pool connection, first-request allocations
            client.get(edge.url + "/").raise_for_status()
    baseline = idle_rss_kib(pid)
    result = MemoryResult(baseline_rss_mib=baseline / 1024)
    log(f"memory: edge idle RSS {baseline / 1024:.1f} MiB; streaming {size / MIB:.0f} MiB each way")
    chunk = b"u" * (256 * 1024)
    with RssSampler(pid) as sampler, httpx.Client(timeout=timeout) as client:
        sampler.take_peak()
        started = time.perf_counter()
        response = client.post(
            edge.url + "/upload",
            content=repeated(chunk, size),
            headers={"content-type": "application/octet-stream", "content-length": str(size)},
        )
        seconds = time.perf_counter() - started
        peak = sampler.take_peak()
        counted = int(response.text) if response.status_code == 200 and response.text.isdigit() else -1
        result.transfers.append(
            Transfer("upload", size, counted, seconds, peak / 1024, (peak - baseline) / 1024, response.status_code)
        )

        sampler.take_peak()
        started = time.perf_counter()
        counted = 0
        with client.stream("GET", edge.url + "/big") as download:
            status = download.status_code
            if download.status_code != 200:
                counted = -1
            else:
                for part in download.iter_raw():
                    counted += len(part)
        seconds = time.perf_counter() - started
        peak = sampler.take_peak()
        result.transfers.append(
            Transfer("download", size, counted, seconds, peak / 1024, (peak - baseline) / 1024, status)
        )
        result.samples = sampler.samples
    for transfer in result.transfers:
        log(
            f"memory: {transfer.direction}: status {transfer.status}, "
            f"{transfer.counted_bytes} of {transfer.expected_bytes} bytes "
            f"in {transfer.seconds:.1f} s ({transfer.expected_bytes / MIB / transfer.seconds:.0f} MiB/s), "
            f"peak RSS {transfer.peak_rss_mib:.1f} MiB (+{transfer.growth_mib:.1f} MiB)"
        )
    return result


# -- checks of the concern targets -----------------------------------------------------------


def response_headers(service: Target) -> dict[str, str]:
    """The headers of `GET /` with the `Origin` wrk sends, names lower-cased."""
    with httpx.Client(timeout=5.0) as client:
        response = client.get(service.url + "/", headers={"origin": ORIGIN})
    if response.status_code != 200:
        raise BenchError(f"{service.name}: GET / with Origin answered {response.status_code}")
    return {name.lower(): value for name, value in response.headers.items()}


def check_concern_headers(services: dict[str, Target], log: Callable[[str], None]) -> dict[str, Any]:
    """Every concern target must send the concerns' headers; reports where they differ."""
    seen = {name: response_headers(services[name]) for name in CONCERN_TARGETS if name in services}
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


def access_log_summary(service: Target) -> AccessLog | None:
    """How many access-log lines the target wrote, against the requests wrk completed."""
    if service.access_log is None or not service.access_log.exists():
        return None
    lines = 0
    with service.access_log.open("rb") as log_file:
        for line in log_file:
            if b'"logger":"edge.access"' in line or b'"logger": "edge.access"' in line:
                lines += 1
    return AccessLog(service.name, lines, service.access_log.stat().st_size / MIB, service.requests_sent)


# -- throughput and latency ------------------------------------------------------------------


@dataclass
class Summary:
    """The median over the rounds of every figure, and the spread of req/s."""

    rounds: list[WrkResult]
    requests_per_sec: float
    min_requests_per_sec: float
    max_requests_per_sec: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    cpu_us_per_request: float | None
    extra_cpu_us_per_request: float | None
    socket_errors: int
    non_2xx: int

    @classmethod
    def of(cls, rounds: list[WrkResult]) -> Summary:
        rps = [r.requests_per_sec for r in rounds]
        cpu = [r.cpu_us_per_request for r in rounds if r.cpu_us_per_request is not None]
        extra = [r.extra_cpu_us_per_request for r in rounds if r.extra_cpu_us_per_request is not None]
        return cls(
            rounds=rounds,
            requests_per_sec=statistics.median(rps),
            min_requests_per_sec=min(rps),
            max_requests_per_sec=max(rps),
            p50_ms=statistics.median(r.p50_ms for r in rounds),
            p90_ms=statistics.median(r.p90_ms for r in rounds),
            p99_ms=statistics.median(r.p99_ms for r in rounds),
            cpu_us_per_request=statistics.median(cpu) if cpu else None,
            extra_cpu_us_per_request=statistics.median(extra) if extra else None,
            socket_errors=sum(r.socket_errors for r in rounds),
            non_2xx=sum(r.non_2xx for r in rounds),
        )

    @property
    def clean(self) -> bool:
        return self.socket_errors == 0 and self.non_2xx == 0


def measure_throughput(
    wrk: str, services: dict[str, Target], args: argparse.Namespace, log: Callable[[str], None]
) -> tuple[dict[str, Summary], dict[str, Summary]]:
    """Interleaved rounds at c=N (every target) and c=1 (every target but the naive proxy)."""
    names = list(services)
    latency_names = [name for name in names if name != NAIVE]
    if args.warmup > 0:
        for name in names:
            log(f"warm-up: {name} ({args.warmup} s)")
            run_wrk(wrk, services[name], args.connections, args.warmup)
    loaded: dict[str, list[WrkResult]] = {name: [] for name in names}
    single: dict[str, list[WrkResult]] = {name: [] for name in latency_names}
    for round_index in range(args.rounds):
        # Rotated each round, so no contender always runs right after the same one.
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            result = run_wrk(wrk, services[name], args.connections, args.duration)
            loaded[name].append(result)
            log(
                f"round {round_index + 1}/{args.rounds} c={args.connections} {name:<{NAME_WIDTH}} "
                f"{result.requests_per_sec:>10,.0f} req/s  p50 {result.p50_ms:8.3f} ms  "
                f"p99 {result.p99_ms:8.3f} ms{_problems(result)}"
            )
        shift = round_index % len(latency_names)
        for name in latency_names[shift:] + latency_names[:shift]:
            result = run_wrk(wrk, services[name], 1, args.latency_duration)
            single[name].append(result)
            log(
                f"round {round_index + 1}/{args.rounds} c=1  {name:<{NAME_WIDTH}} "
                f"{result.requests_per_sec:>10,.0f} req/s  p50 {result.p50_ms:8.3f} ms  "
                f"p99 {result.p99_ms:8.3f} ms{_problems(result)}"
            )
    return (
        {name: Summary.of(results) for name, results in loaded.items()},
        {name: Summary.of(results) for name, results in single.items()},
    )


def _problems(result: WrkResult) -> str:
    if result.socket_errors or result.non_2xx:
        return f"  [{result.non_2xx} non-2xx, {result.socket_errors} socket errors]"
    return ""


# -- the report ------------------------------------------------------------------------------


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _tool_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def machine_info(wrk: str, nginx: str | None) -> dict[str, Any]:
    return {
        **machine(),
        "uvicorn": _version("uvicorn"),
        "uvloop": _version("uvloop"),
        "httptools": _version("httptools"),
        "starlette": _version("starlette"),
        "httpx": _version("httpx"),
        "nginx": _tool_version([nginx, "-v"]) if nginx else "not installed",
        "wrk": _tool_version([wrk, "-v"]).split(" [")[0],
        "load_average_at_start": os.getloadavg()[0],
        "edge_source": _edge_source(),
    }


def _edge_source() -> str:
    """The commit the measured edge came from, and whether edge/ had local changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "edge"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit} (edge/ modified)" if dirty else commit


def _size(n: int) -> str:
    return f"{n / GIB:g} GiB" if n >= GIB else f"{n / MIB:g} MiB"


def _verdict(passed: bool | None) -> str:
    return "SKIP" if passed is None else ("PASS" if passed else "FAIL")


def _clean(name: str, loaded: dict[str, Summary], single: dict[str, Summary]) -> bool:
    """No socket errors and no non-2xx answers, at c=N and at c=1."""
    return (name not in loaded or loaded[name].clean) and (name not in single or single[name].clean)


def _ratio_target(
    label: str,
    threshold: float,
    measured: str,
    reference: str,
    loaded: dict[str, Summary],
    single: dict[str, Summary],
    why_missing: str,
) -> dict[str, Any]:
    """`measured` req/s >= `threshold` of `reference`'s; FAIL when either had errors."""
    if measured not in loaded or reference not in loaded:
        return {"name": label, "value": None, "shown": f"n/a ({why_missing})", "verdict": "SKIP"}
    ratio = loaded[measured].requests_per_sec / loaded[reference].requests_per_sec
    problems = [name for name in (measured, reference) if not _clean(name, loaded, single)]
    shown = f"{ratio:.1%}" + (f" (errors from {', '.join(problems)})" if problems else "")
    return {
        "name": label,
        "value": ratio,
        "shown": shown,
        "verdict": _verdict(ratio >= threshold and not problems),
    }


def build_report(
    args: argparse.Namespace,
    machine: dict[str, Any],
    loaded: dict[str, Summary],
    single: dict[str, Summary],
    memory: MemoryResult | None,
    headers: dict[str, Any] | None,
    access_logs: list[AccessLog],
    notes: list[str],
) -> dict[str, Any]:
    def over(measured: str, reference: str) -> float | None:
        if measured in loaded and reference in loaded:
            return loaded[measured].requests_per_sec / loaded[reference].requests_per_sec
        return None

    ratios: dict[str, float | None] = {
        "edge_over_nginx": over(EDGE, NGINX),
        "naive_over_nginx": over(NAIVE, NGINX),
        "edge_over_naive": over(EDGE, NAIVE),
        "edge_all_memory_over_nginx_equivalent": over(EDGE_ALL_MEMORY, NGINX_EQUIVALENT),
        "edge_all_redis_over_nginx_equivalent": over(EDGE_ALL_REDIS, NGINX_EQUIVALENT),
        "edge_all_memory_over_edge": over(EDGE_ALL_MEMORY, EDGE),
        "edge_all_redis_over_edge": over(EDGE_ALL_REDIS, EDGE),
        "nginx_equivalent_over_nginx": over(NGINX_EQUIVALENT, NGINX),
    }
    added_latency_ms = {
        name: summary.p50_ms - single[DIRECT].p50_ms for name, summary in single.items() if name != DIRECT
    }
    added_ms = added_latency_ms[EDGE]
    edge_clean = _clean(EDGE, loaded, single)

    no_nginx = "nginx not installed or --no-nginx"
    no_concerns = "--skip-concerns"
    targets: list[dict[str, Any]] = [
        _ratio_target(
            f"edge req/s >= 12 % of nginx (c={args.connections})",
            TARGET_EDGE_OVER_NGINX,
            EDGE,
            NGINX,
            loaded,
            single,
            no_nginx,
        ),
        {
            "name": "edge added median latency <= 0.35 ms (c=1)",
            "value": added_ms,
            "shown": f"{added_ms:.3f} ms",
            "verdict": _verdict(added_ms <= TARGET_ADDED_LATENCY_MS and edge_clean),
        },
    ]
    for direction in ("upload", "download"):
        transfer = next((t for t in memory.transfers if t.direction == direction), None) if memory else None
        targets.append(
            {
                "name": f"edge RSS growth, {_size(args.memory_bytes)} {direction} <= 32 MiB",
                "value": transfer.growth_mib if transfer else None,
                "shown": (
                    f"{transfer.growth_mib:.1f} MiB" + ("" if transfer.bytes_ok else " (BYTE COUNT WRONG)")
                    if transfer
                    else "n/a (skipped)"
                ),
                "verdict": _verdict(
                    None if transfer is None else transfer.growth_mib <= TARGET_RSS_GROWTH_MIB and transfer.bytes_ok
                ),
            }
        )
    targets.append(
        _ratio_target(
            f"edge, all concerns, memory store req/s >= 10 % of nginx, equivalent configuration (c={args.connections})",
            TARGET_EDGE_ALL_MEMORY_OVER_NGINX_EQ,
            EDGE_ALL_MEMORY,
            NGINX_EQUIVALENT,
            loaded,
            single,
            no_concerns if args.skip_concerns else no_nginx,
        )
    )
    targets.append(
        _ratio_target(
            f"edge, all concerns, Redis store req/s >= 6 % of nginx, equivalent configuration (c={args.connections})",
            TARGET_EDGE_ALL_REDIS_OVER_NGINX_EQ,
            EDGE_ALL_REDIS,
            NGINX_EQUIVALENT,
            loaded,
            single,
            no_concerns
            if args.skip_concerns
            else (no_nginx if NGINX_EQUIVALENT not in loaded else "Redis not reachable"),
        )
    )
    for name in loaded:
        if not _clean(name, loaded, single):
            notes.append(f"{name} answered with socket errors or non-2xx responses: its measurements are FAIL")
    machine["load_average_at_end"] = os.getloadavg()[0]
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            "connections": args.connections,
            "duration_s": args.duration,
            "latency_duration_s": args.latency_duration,
            "rounds": args.rounds,
            "warmup_s": args.warmup,
            "memory_bytes": args.memory_bytes if not args.skip_memory else None,
            "wrk_header": f"Origin: {ORIGIN}",
            "concerns": not args.skip_concerns,
        },
        "machine": machine,
        "throughput": {name: asdict(summary) for name, summary in loaded.items()},
        "latency_c1": {name: asdict(summary) for name, summary in single.items()},
        "added_latency_ms": added_latency_ms,
        "edge_added_latency_ms": added_ms,
        "nginx_added_latency_ms": added_latency_ms.get(NGINX),
        "ratios": ratios,
        "memory": asdict(memory) if memory else None,
        "headers": headers,
        "access_logs": [asdict(entry) for entry in access_logs],
        "targets": targets,
        "notes": notes,
    }


def format_report(
    report: dict[str, Any],
    loaded: dict[str, Summary],
    single: dict[str, Summary],
    memory: MemoryResult | None,
) -> str:
    settings = report["settings"]
    machine = report["machine"]
    out: list[str] = []
    out.append("")
    out.append(
        f"Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), Python {machine['python']}, "
        f"uvicorn {machine['uvicorn']}, {machine['nginx']}, {machine['wrk']}; "
        f"load average {machine['load_average_at_start']:.2f} -> {machine['load_average_at_end']:.2f}; "
        f"edge from {machine['edge_source']}"
    )
    out.append(
        f"wrk -t1 -c{settings['connections']} -d{settings['duration_s']}s and "
        f"-c1 -d{settings['latency_duration_s']}s, -H '{settings['wrk_header']}', "
        f"{settings['rounds']} interleaved rounds, median per target"
    )
    out.append("")
    header = (
        f"| target | req/s c={settings['connections']} | (min-max) | p50 ms | p90 ms | p99 ms "
        "| server CPU us/req | c=1 p50 ms | c=1 p99 ms | errors |"
    )
    out.append(header)
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, summary in loaded.items():
        c1 = single.get(name)
        cpu = f"{summary.cpu_us_per_request:.0f}" if summary.cpu_us_per_request is not None else "-"
        if summary.extra_cpu_us_per_request is not None:
            cpu += f" (+{summary.extra_cpu_us_per_request:.0f} Redis)"
        problems = summary.socket_errors + summary.non_2xx + (c1.socket_errors + c1.non_2xx if c1 else 0)
        out.append(
            f"| {name} | {summary.requests_per_sec:,.0f} | {summary.min_requests_per_sec:,.0f}-"
            f"{summary.max_requests_per_sec:,.0f} | {summary.p50_ms:.3f} | {summary.p90_ms:.3f} | "
            f"{summary.p99_ms:.3f} | {cpu} | {f'{c1.p50_ms:.3f}' if c1 else '-'} | "
            f"{f'{c1.p99_ms:.3f}' if c1 else '-'} | {problems} |"
        )
    out.append("")
    ratios = report["ratios"]

    def pct(value: float | None) -> str:
        return f"{value:.1%}" if value is not None else "n/a"

    out.append(f"edge / nginx req/s:  {pct(ratios['edge_over_nginx'])}")
    out.append(f"naive / nginx req/s: {pct(ratios['naive_over_nginx'])}")
    edge_over_naive = ratios["edge_over_naive"]
    out.append(f"edge / naive req/s:  {f'{edge_over_naive:.1f}x' if edge_over_naive else 'n/a'}")
    if settings["concerns"]:
        out.append(
            "edge, all concerns / nginx, equivalent configuration req/s: "
            f"memory store {pct(ratios['edge_all_memory_over_nginx_equivalent'])}, "
            f"Redis store {pct(ratios['edge_all_redis_over_nginx_equivalent'])}"
        )
        out.append(
            "cost of the concerns (with / without, req/s): "
            f"edge memory store {pct(ratios['edge_all_memory_over_edge'])}, "
            f"edge Redis store {pct(ratios['edge_all_redis_over_edge'])}, "
            f"nginx {pct(ratios['nginx_equivalent_over_nginx'])}"
        )
    out.append(
        "added median latency at c=1 over upstream direct: "
        + ", ".join(f"{name} {value:.3f} ms" for name, value in report["added_latency_ms"].items())
    )
    for entry in report["access_logs"]:
        out.append(
            f"access log of {entry['target']}: {entry['lines']:,} lines, {entry['size_mib']:.0f} MiB, "
            f"for {entry['requests_sent']:,} requests completed by wrk"
        )
    if memory is not None:
        out.append(f"edge idle RSS before the transfers: {memory.baseline_rss_mib:.1f} MiB")
        for transfer in memory.transfers:
            out.append(
                f"  {transfer.direction:<8} {transfer.expected_bytes / MIB:.0f} MiB: peak RSS "
                f"{transfer.peak_rss_mib:.1f} MiB (+{transfer.growth_mib:.1f} MiB), "
                f"status {transfer.status}, {transfer.counted_bytes} bytes counted "
                f"({'ok' if transfer.bytes_ok else 'WRONG'}), "
                f"{transfer.expected_bytes / MIB / transfer.seconds:.0f} MiB/s"
            )
    out.append("")
    out.append("Targets:")
    for target in report["targets"]:
        out.append(f"  [{target['verdict']}] {target['name']}: {target['shown']}")
    for note in report["notes"]:
        out.append(f"Note: {note}")
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------


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
    interrupt_on_signals()
    wrk = shutil.which("wrk")
    if wrk is None:
        print("proxy_bench: wrk is not installed (make bench installs it)", file=sys.stderr)
        return 2
    notes: list[str] = []
    nginx = None if args.no_nginx else find_nginx()
    if nginx is None:
        notes.append("nginx not run (not installed or --no-nginx): the targets against nginx are skipped")
        log("nginx is not installed: measuring without it")

    redis_store = None
    if not args.skip_concerns:
        redis_store = RedisStore(args.redis_url)
        why_not = redis_store.ping()
        if why_not is not None:
            notes.append(f"Redis at {args.redis_url} not reachable ({why_not}): the Redis-store edge is skipped")
            log(f"Redis is not reachable ({why_not}): measuring without the Redis-store edge")
            redis_store.close()
            redis_store = None
        else:
            log(f"Redis store: {args.redis_url}, key prefix {redis_store.prefix}")

    tmp = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    tmp.chmod(0o755)  # nginx's worker may run as another user
    keep_tmp = args.keep_tmp
    services = build_services(tmp, nginx, args.memory_bytes, not args.skip_concerns, redis_store)
    started: list[Target] = []
    try:
        upstream = services[DIRECT]
        upstream.start()
        started.append(upstream)
        upstream.wait_ready()
        for name, service in services.items():
            if name != DIRECT:
                service.start()
                started.append(service)
        for service in started[1:]:
            service.wait_ready()
        log("servers: " + ", ".join(f"{s.name} on :{s.port} (pid {s.pid})" for s in started))

        machine = machine_info(wrk, nginx)
        headers = None if args.skip_concerns else check_concern_headers(services, log)
        memory = None if args.skip_memory else measure_memory(services[EDGE], args.memory_bytes, log)
        loaded, single = measure_throughput(wrk, services, args, log)
        for service in started:
            if service.proc is not None and service.proc.poll() is not None:
                notes.append(f"{service.name} exited during the run; see its log")
        access_logs = [entry for entry in map(access_log_summary, services.values()) if entry is not None]
        for entry in access_logs:
            if entry.lines < entry.requests_sent:
                notes.append(
                    f"{entry.target} logged {entry.lines:,} requests of {entry.requests_sent:,}: "
                    "its access log is incomplete"
                )
        report = build_report(args, machine, loaded, single, memory, headers, access_logs, notes)
        print(format_report(report, loaded, single, memory), flush=True)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
            log(f"results written to {args.json}")
    except KeyboardInterrupt:
        print("\nproxy_bench: interrupted; stopping the servers", file=sys.stderr)
        return 130
    except (BenchError, httpx.HTTPError, OSError, subprocess.TimeoutExpired) as exc:
        keep_tmp = True
        print(f"proxy_bench: the benchmark could not run: {exc}", file=sys.stderr)
        print(f"proxy_bench: server logs kept in {tmp}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the clean-up
        for service in reversed(started):
            service.stop()
        if redis_store is not None:
            try:
                deleted = redis_store.delete_keys()
                log(f"Redis: deleted {deleted} keys under {redis_store.prefix}:")
            except redis.RedisError as exc:
                print(
                    f"proxy_bench: could not delete the Redis keys {redis_store.prefix}:* ({exc})",
                    file=sys.stderr,
                )
            redis_store.close()
        if not keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
