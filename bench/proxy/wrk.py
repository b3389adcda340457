"""wrk against the contenders: its command line, its output read, each run charged the CPU the
measured server spent, and the interleaved rounds summarised as medians."""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
from dataclasses import dataclass

from bench.proxy.contenders import NAIVE, NAME_WIDTH, ORIGIN, Server
from bench.support import BenchError, log

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


def run_wrk(wrk: str, server: Server, connections: int, duration: int) -> WrkResult:
    argv = wrk_argv(wrk, server.url, connections, duration)
    extra_before = server.extra_cpu() if server.extra_cpu else 0.0
    cpu_before = server.cpu_seconds()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    cpu_used = server.cpu_seconds() - cpu_before
    extra_used = server.extra_cpu() - extra_before if server.extra_cpu else None
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    result = parse_wrk(done.stdout)
    server.requests_sent += result.requests
    if result.requests:
        result.cpu_us_per_request = cpu_used / result.requests * 1e6
        if extra_used is not None:
            result.extra_cpu_us_per_request = extra_used / result.requests * 1e6
    return result


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
    wrk: str, servers: dict[str, Server], args: argparse.Namespace
) -> tuple[dict[str, Summary], dict[str, Summary]]:
    """Interleaved rounds at c=N (every contender) and c=1 (every contender but the naive proxy)."""
    names = list(servers)
    latency_names = [name for name in names if name != NAIVE]
    if args.warmup > 0:
        for name in names:
            log(f"warm-up: {name} ({args.warmup} s)")
            run_wrk(wrk, servers[name], args.connections, args.warmup)
    loaded: dict[str, list[WrkResult]] = {name: [] for name in names}
    single: dict[str, list[WrkResult]] = {name: [] for name in latency_names}
    for round_index in range(args.rounds):
        # Rotated each round, so no contender always runs right after the same one.
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            result = run_wrk(wrk, servers[name], args.connections, args.duration)
            loaded[name].append(result)
            log(
                f"round {round_index + 1}/{args.rounds} c={args.connections} {name:<{NAME_WIDTH}} "
                f"{result.requests_per_sec:>10,.0f} req/s  p50 {result.p50_ms:8.3f} ms  "
                f"p99 {result.p99_ms:8.3f} ms{error_note(result)}"
            )
        shift = round_index % len(latency_names)
        for name in latency_names[shift:] + latency_names[:shift]:
            result = run_wrk(wrk, servers[name], 1, args.latency_duration)
            single[name].append(result)
            log(
                f"round {round_index + 1}/{args.rounds} c=1  {name:<{NAME_WIDTH}} "
                f"{result.requests_per_sec:>10,.0f} req/s  p50 {result.p50_ms:8.3f} ms  "
                f"p99 {result.p99_ms:8.3f} ms{error_note(result)}"
            )
    return (
        {name: Summary.of(results) for name, results in loaded.items()},
        {name: Summary.of(results) for name, results in single.items()},
    )


def error_note(result: WrkResult) -> str:
    """For a progress line: the run's errors, when it had any."""
    if result.socket_errors or result.non_2xx:
        return f"  [{result.non_2xx} non-2xx, {result.socket_errors} socket errors]"
    return ""
