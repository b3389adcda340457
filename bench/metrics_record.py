"""What one recorded observation of a labelled histogram costs: the OpenTelemetry SDK against
prometheus-client, in-process and in its multiprocess mode (docs/benchmarks.md,
"Metrics on the hot path"; the choice it informs: docs/metrics.md#how).

The histogram is the edge's `http_server_request_duration_seconds` (labels
`http_request_method`, `http_route`, `http_response_status_code`; the buckets of
common/metrics.py, given to the SDK as its bucket advice):

- `opentelemetry-sdk`: a `MeterProvider` with an `InMemoryMetricReader`,
  `create_histogram("http.server.request.duration", unit="s").record(v, attributes)`;
- `prometheus-client`: `Histogram(...).labels(method, route, status).observe(v)`;
- `prometheus-client, multiprocess`: the same with `PROMETHEUS_MULTIPROC_DIR` set to a
  fresh temp dir, which the library reads when it is imported: every value goes to a
  memory-mapped file (what the edge does with `EDGE_WORKERS` > 1);
- and, for scale, what one request pays in the edge: its metrics middleware
  (`RequestDurationMiddleware` around `EdgeErrorsMiddleware`, as `EDGE_METRICS_PORT`
  installs them) around an ASGI app that only answers, less that app alone; as many
  requests as observations.

Every measurement runs in a fresh subprocess of this script (so each library is imported
with its own environment), in interleaved rounds with the order rotated; a round is
`--observations` observations after a tenth as many untimed, cycling through 8 label sets
and 64 durations spread over the buckets. The figure is the loop's time per observation
less that of the same loop doing nothing (reported too), so it is the call's cost. Each
subprocess checks that its histogram counted every observation (the SDK's collected
data points, the registry's `_count` samples, the multiprocess files' sum). The median
over the rounds is reported, with the ratios.

Run: `.venv/bin/python bench/metrics_record.py [--rounds 5 --observations 200000 --json PATH]`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.support import ROOT, BenchError, log, machine

OTEL, PROMETHEUS, MULTIPROCESS = "opentelemetry-sdk", "prometheus-client", "prometheus-client, multiprocess"
EDGE_MIDDLEWARES = "edge's metrics middlewares, per request"
CONTENDERS = (OTEL, PROMETHEUS, MULTIPROCESS, EDGE_MIDDLEWARES)
LABEL_SETS = [
    (method, route, status)
    for method, route in (("GET", "/_edge/ready"), ("POST", "/api/v1/sessions/*/turns"), ("GET", "other"))
    for status in ("200", "404", "502")
][:8]
# Durations from 1 ms to about 20 s, so observations land in every part of the buckets.
VALUES = [0.001 * 1.17**i for i in range(64)]


def samples(count: int) -> list[tuple[tuple[str, str, str], float]]:
    return [(LABEL_SETS[i % len(LABEL_SETS)], VALUES[i % len(VALUES)]) for i in range(count)]


def time_loop(loop: Callable[[], None]) -> float:
    started = time.perf_counter_ns()
    loop()
    return (time.perf_counter_ns() - started) / 1000.0  # µs


def baseline_us(pairs: list[tuple[tuple[str, str, str], float]]) -> float:
    def loop() -> None:
        for (_method, _route, _status), _value in pairs:
            pass

    return time_loop(loop)


def measure_otel(pairs: list[tuple[tuple[str, str, str], float]], warmup: int) -> tuple[float, int]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

    from common.metrics import DURATION_BUCKETS

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    histogram = provider.get_meter("bench").create_histogram(
        "http.server.request.duration", unit="s", explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS)
    )
    attribute_pairs = [
        ({"http.request.method": m, "http.route": r, "http.response.status_code": s}, v) for (m, r, s), v in pairs
    ]
    for attributes, value in attribute_pairs[:warmup]:
        histogram.record(value, attributes)

    def loop() -> None:
        for attributes, value in attribute_pairs:
            histogram.record(value, attributes)

    elapsed = time_loop(loop)
    data = reader.get_metrics_data()
    counted = 0
    if data is not None:
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        if isinstance(point, HistogramDataPoint):
                            counted += point.count
    provider.shutdown()
    return elapsed, counted - warmup


def measure_prometheus(pairs: list[tuple[tuple[str, str, str], float]], warmup: int) -> tuple[float, int]:
    from prometheus_client import CollectorRegistry, Histogram

    from common.metrics import DURATION_BUCKETS

    registry = CollectorRegistry()
    histogram = Histogram(
        "http_server_request_duration_seconds",
        "Duration of HTTP server requests",
        ["http_request_method", "http_route", "http_response_status_code"],
        buckets=DURATION_BUCKETS,
        registry=registry,
    )
    for (method, route, status), value in pairs[:warmup]:
        histogram.labels(method, route, status).observe(value)

    def loop() -> None:
        for (method, route, status), value in pairs:
            histogram.labels(method, route, status).observe(value)

    elapsed = time_loop(loop)
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory is None:
        collected = registry.collect()
    else:
        from prometheus_client import multiprocess

        if not list(Path(directory).glob("histogram_*.db")):
            raise BenchError(f"multiprocess mode wrote no histogram file in {directory}")
        files = CollectorRegistry()
        multiprocess.MultiProcessCollector(files, path=directory)  # type: ignore[no-untyped-call]
        collected = files.collect()
    counted = sum(
        int(sample.value)
        for family in collected
        for sample in family.samples
        if sample.name == "http_server_request_duration_seconds_count"
    )
    return elapsed, counted - warmup


def measure_edge_middlewares(requests: int) -> dict[str, float]:
    """Per request, what the edge's metrics middleware adds around an ASGI app that only
    answers (`GET /`, 200, two messages): timing, the route label, the observation and the
    error counter's check, as `EDGE_METRICS_PORT` installs them (edge/app.py)."""
    import asyncio

    from prometheus_client import CollectorRegistry
    from starlette.types import Message, Receive, Scope, Send

    from common.metrics import RequestDurationMiddleware
    from edge.concerns.request_metrics import EdgeErrors, RouteLabels
    from edge.metrics import EdgeMetrics
    from edge.policy import load_policy

    metrics = EdgeMetrics.build(CollectorRegistry())
    start: Message = {"type": "http.response.start", "status": 200, "headers": []}
    body: Message = {"type": "http.response.body", "body": b"ok"}

    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        await send(start)
        await send(body)

    async def send(message: Message) -> None:
        return None

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    wrapped = RequestDurationMiddleware(
        answer, metrics.request_duration, RouteLabels(load_policy(None)), EdgeErrors(metrics.errors)
    )

    async def per_request_us(app: Callable[[Scope, Receive, Send], Any]) -> float:
        scope: Scope = {"type": "http", "method": "GET", "path": "/"}
        for _ in range(requests // 10):
            await app(scope, receive, send)
        started = time.perf_counter_ns()
        for _ in range(requests):
            await app(scope, receive, send)
        return (time.perf_counter_ns() - started) / 1000.0 / requests

    bare = asyncio.run(per_request_us(answer))
    with_metrics = asyncio.run(per_request_us(wrapped))
    counted = sum(
        sample.value
        for family in metrics.request_duration.collect()
        for sample in family.samples
        if sample.name.endswith("_count")
    )
    if counted != requests + requests // 10:
        raise BenchError(f"the edge's middlewares counted {counted:,.0f} of {requests + requests // 10:,} requests")
    return {"bare_us": bare, "with_metrics_us": with_metrics, "us_per_observation": with_metrics - bare}


def worker(contender: str, observations: int) -> dict[str, Any]:
    """One round of one contender, in this (fresh) process: its figures as JSON on stdout."""
    if contender == EDGE_MIDDLEWARES:
        return {"contender": contender, **measure_edge_middlewares(observations)}
    pairs = samples(observations)
    warmup = max(1, observations // 10)
    measure = measure_otel if contender == OTEL else measure_prometheus
    elapsed, counted = measure(pairs, warmup)
    if counted != observations:
        raise BenchError(f"{contender}: the histogram counted {counted:,} of {observations:,} observations")
    return {"contender": contender, "loop_us": elapsed, "baseline_us": baseline_us(pairs), "counted": counted}


def run_worker(contender: str, observations: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with tempfile.TemporaryDirectory(prefix="metrics-record-") as directory:
        if contender == MULTIPROCESS:
            env["PROMETHEUS_MULTIPROC_DIR"] = directory  # before the worker imports prometheus_client
        argv = [sys.executable, __file__, "--worker", contender, "--observations", str(observations)]
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise BenchError(f"{contender} worker failed ({done.returncode}):\n{done.stderr or done.stdout}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Cost of one labelled-histogram observation: OTel SDK vs prometheus")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per contender (5)")
    parser.add_argument("--observations", type=int, default=200_000, help="timed observations per round (200000)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.observations < 10:
        parser.error("--rounds must be >= 1 and --observations >= 10")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.observations)))
        return 0
    try:
        report = run(args)
    except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"metrics_record: the benchmark could not run: {exc}", file=sys.stderr)
        return 2
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"results written to {args.json}")
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}
    for round_index in range(args.rounds):
        shift = round_index % len(CONTENDERS)
        for name in CONTENDERS[shift:] + CONTENDERS[:shift]:
            result = run_worker(name, args.observations)
            if name != EDGE_MIDDLEWARES:
                result["us_per_observation"] = (result["loop_us"] - result["baseline_us"]) / args.observations
            rounds[name].append(result)
            log(f"round {round_index + 1}/{args.rounds} {name:<40} {result['us_per_observation']:.3f} µs/observation")
    medians = {name: statistics.median(r["us_per_observation"] for r in results) for name, results in rounds.items()}
    spread = {
        name: (min(r["us_per_observation"] for r in results), max(r["us_per_observation"] for r in results))
        for name, results in rounds.items()
    }
    loop_us = statistics.median(
        r["baseline_us"] / args.observations for name in (OTEL, PROMETHEUS, MULTIPROCESS) for r in rounds[name]
    )
    ratios = {
        f"{OTEL} / {PROMETHEUS}": medians[OTEL] / medians[PROMETHEUS],
        f"{OTEL} / {MULTIPROCESS}": medians[OTEL] / medians[MULTIPROCESS],
        f"{MULTIPROCESS} / {PROMETHEUS}": medians[MULTIPROCESS] / medians[PROMETHEUS],
    }
    lines = [
        "",
        f"one labelled-histogram observation, {args.observations:,} per round, median of {args.rounds} rounds",
        f"(empty loop, subtracted: {loop_us:.3f} µs per iteration)",
        "",
        f"| {'library':<40} | µs/observation | min-max |",
        f"|{'-' * 42}|---------------:|--------:|",
    ]
    for name in CONTENDERS:
        low, high = spread[name]
        lines.append(f"| {name:<40} | {medians[name]:>14.3f} | {low:.3f}-{high:.3f} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {name} | {value:.2f}x |" for name, value in ratios.items()]
    print("\n".join(lines), flush=True)
    versions = {name: importlib.metadata.version(name) for name in ("opentelemetry-sdk", "prometheus-client")}
    return {
        "machine": {**machine(), **versions, "load_average_at_start": os.getloadavg()[0]},
        "observations_per_round": args.observations,
        "rounds": rounds,
        "empty_loop_us_per_iteration": loop_us,
        "median_us_per_observation": medians,
        "min_max_us_per_observation": spread,
        "ratios": ratios,
    }


if __name__ == "__main__":
    sys.exit(main())
