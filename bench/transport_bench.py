"""The outbound transport's cost: its overhead per successful call over a bare httpx
transport, and how fast it rejects a call while a breaker is open.

1. starts the tiny upstream (bench/tiny_upstream.py) in its own process on a free
   loopback port, and always stops it;
2. overhead: `--calls` sequential GETs through an `httpx.AsyncClient` on a bare
   `httpx.AsyncHTTPTransport`, then as many through a client from `Outbound` (the
   `ResilientTransport` wrapping the same kind of transport), in `--rounds` interleaved
   rounds (the order alternates). Each round pairs two runs a second apart, so the
   overhead is taken per round and its median over the rounds is reported: on a shared
   machine the per-call time drifts by more than the overhead between rounds. Telemetry
   is the OpenTelemetry API's default (no SDK), so this is the transport's own cost;
   `--sdk` also measures it with the SDK recording every span and metric (nothing
   exported), for information;
3. rejections: a breaker is opened (calls to a closed port), then `--rejections` calls
   are timed one by one, as the caller sees them (`await client.get(...)` raising
   `BreakerOpen`); p50 and p99;
4. prints the numbers and PASS/FAIL against the targets: overhead <= 10 %, rejection
   p99 <= 1 ms. Exit status 1 when a target is missed, 2 when the benchmark could not run.

The client runs on uvloop, as the app does. Run:
`.venv/bin/python bench/transport_bench.py [--calls 1000 --rounds 31 --sdk]`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path

import httpx
import uvloop
from opentelemetry.sdk.trace import TracerProvider

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry

from app.outbound import BreakerOpen, HostPolicy, Outbound, OutboundSettings
from app.outbound.telemetry import OutboundMetrics
from bench.support import BENCH_DIR, BenchError, Service, free_port, percentile, run_benchmark

OVERHEAD_TARGET = 0.10
REJECTION_P99_TARGET = 0.001


async def per_call_seconds(client: httpx.AsyncClient, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        response = await client.get("/")
        if response.status_code != 200:
            raise BenchError(f"upstream answered {response.status_code}")
    return (time.perf_counter() - started) / calls


async def overhead(url: str, outbound: Outbound, calls: int, rounds: int) -> tuple[list[float], list[float]]:
    """Per-call seconds of each round: (bare, resilient)."""
    bare = httpx.AsyncClient(base_url=url, transport=httpx.AsyncHTTPTransport(trust_env=False), trust_env=False)
    resilient = outbound.client("bench", url)
    for client in (bare, resilient):
        await per_call_seconds(client, calls // 4)  # connections open, code paths warm
    bare_rounds: list[float] = []
    resilient_rounds: list[float] = []
    for round_number in range(rounds):
        order = [(bare, bare_rounds), (resilient, resilient_rounds)]
        for client, results in order if round_number % 2 == 0 else reversed(order):
            gc.collect()  # a collection falls in neither run
            results.append(await per_call_seconds(client, calls))
    await bare.aclose()
    await resilient.aclose()
    return bare_rounds, resilient_rounds


async def rejection_latencies(rejections: int) -> list[float]:
    closed = f"http://127.0.0.1:{free_port()}"
    breaker_policy = HostPolicy(minimum_calls=1, window_size=1, open_seconds=3600, max_retries=0)
    outbound = Outbound(OutboundSettings(default=breaker_policy))
    client = outbound.client("closed", closed)
    with contextlib.suppress(httpx.ConnectError):
        await client.get("/")  # the breaker opens on this failure
    latencies: list[float] = []
    for _ in range(rejections):
        started = time.perf_counter()
        try:
            await client.get("/")
        except BreakerOpen:
            latencies.append(time.perf_counter() - started)
        except httpx.ConnectError as exc:
            raise BenchError("a call went through an open breaker") from exc
    await outbound.aclose()
    if len(latencies) != rejections:
        raise BenchError("a call went through an open breaker")
    return latencies


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def paired_overhead(bare: list[float], resilient: list[float]) -> tuple[float, float]:
    """Median over the rounds of the relative and the absolute (seconds) overhead."""
    return (
        statistics.median(r / b - 1 for b, r in zip(bare, resilient, strict=True)),
        statistics.median(r - b for b, r in zip(bare, resilient, strict=True)),
    )


async def run(url: str, args: argparse.Namespace) -> bool:
    bare, resilient = await overhead(url, Outbound(OutboundSettings()), args.calls, args.rounds)
    added, added_seconds = paired_overhead(bare, resilient)
    print(f"per successful call, {args.rounds} rounds of {args.calls} sequential GETs each (medians):")
    print(f"  bare httpx transport      {statistics.median(bare) * 1e6:8.1f} us")
    print(f"  ResilientTransport        {statistics.median(resilient) * 1e6:8.1f} us")
    print(
        f"  overhead, paired rounds   {added * 100:8.1f} %  (+{added_seconds * 1e6:.1f} us)  "
        f"{verdict(added <= OVERHEAD_TARGET)} (<= {OVERHEAD_TARGET:.0%})"
    )
    if args.sdk:
        recording = Outbound(
            OutboundSettings(),
            tracer=TracerProvider().get_tracer("bench"),
            metrics=OutboundMetrics.build(CollectorRegistry()),
        )
        sdk_added, sdk_added_seconds = paired_overhead(*await overhead(url, recording, args.calls, args.rounds))
        print(
            f"  with the OpenTelemetry SDK recording spans and metrics: "
            f"{sdk_added * 100:.1f} % (+{sdk_added_seconds * 1e6:.1f} us)"
        )

    latencies = await rejection_latencies(args.rejections)
    p50, p99 = percentile(latencies, 0.50), percentile(latencies, 0.99)
    print(f"rejected while the breaker is open, {args.rejections} calls through an AsyncClient:")
    print(f"  p50 {p50 * 1e6:.1f} us, p99 {p99 * 1e6:.1f} us, max {max(latencies) * 1e6:.1f} us  ", end="")
    print(f"{verdict(p99 <= REJECTION_P99_TARGET)} (p99 <= {REJECTION_P99_TARGET * 1e3:g} ms)")
    return added <= OVERHEAD_TARGET and p99 <= REJECTION_P99_TARGET


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000, help="sequential calls per round")
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--rejections", type=int, default=10000)
    parser.add_argument("--sdk", action="store_true", help="also measure with the OpenTelemetry SDK")
    args = parser.parse_args()
    return run_benchmark("transport_bench", lambda tmp, cleanup: measure(args, tmp, cleanup))


def measure(args: argparse.Namespace, tmp: Path, cleanup: contextlib.ExitStack) -> tuple[None, int]:
    port = free_port()
    upstream = Service(
        "tiny upstream",
        [sys.executable, str(BENCH_DIR / "tiny_upstream.py"), "--port", str(port)],
        port,
        tmp / "upstream.log",
    )
    upstream.start()
    cleanup.callback(upstream.stop)
    upstream.wait_ready()
    passed = uvloop.run(run(upstream.url, args))
    return None, 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
