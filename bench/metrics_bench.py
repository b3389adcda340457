"""The edge's throughput with metrics on and off, in one run (docs/benchmarks.md, "Metrics on
the hot path").

1. starts the tiny upstream (bench/tiny_upstream.py) and two `python -m edge` processes,
   both the plain edge of the proxy benchmark (bench/proxy/contenders.py: one worker, rate
   limiting and access log off, its settings taken from there unchanged), one of them with
   `EDGE_METRICS_PORT` set to a free port (`RequestDurationMiddleware` and
   `EdgeErrorsMiddleware` on every request, `/metrics` served), the other without (neither
   middleware installed); checks that the first serves `/metrics` on its metrics port
   and the second does not serve the series on its public port;
2. `wrk -t1 -c50 -d<N>s --latency` against both (bench/proxy/wrk.py's runner and parsing,
   which also charge each run the CPU the edge's processes spent), after an untimed
   warm-up, in interleaved rounds with the order alternating;
3. reports the median req/s, p50/p99 latency and CPU per request of each, the ratio on/off
   of the medians (the goal, "metrics on at most 5 % lower in req/s", is judged on it:
   PASS/FAIL), and each round's ratio of its two back-to-back runs with their median;
4. scrapes the metrics port and checks that `http_server_request_duration_seconds_count`,
   summed over its labels, is at least the number of requests wrk completed against that
   edge (warm-up included); the readiness checks come on top.

Exit status 0 whatever the verdict, 1 when the scrape's count is short (the measurement is
wrong, not slow), 2 when the benchmark could not run.

Run: `.venv/bin/python bench/metrics_bench.py [--rounds 5 --duration 5 --json PATH]`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client.parser import text_string_to_metric_families

from bench.proxy.contenders import DIRECT, EDGE, Server, build_contenders
from bench.proxy.report import machine_info
from bench.proxy.wrk import Summary, WrkResult, error_note, run_wrk
from bench.support import BenchError, free_port, log, run_benchmark

METRICS_OFF, METRICS_ON = "edge, metrics off", "edge, metrics on"
COUNT_SERIES = "http_server_request_duration_seconds_count"
GOAL = 0.95  # metrics on: at least 95 % of the req/s with them off


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The edge's throughput with Prometheus metrics on vs off.")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (5)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of untimed wrk per edge first (2)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (server logs)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration < 1 or args.connections < 1 or args.warmup < 0:
        parser.error("--rounds, --duration and --connections must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        print("metrics_bench: wrk is not installed (scripts/install_debian_packages.sh wrk:wrk)", file=sys.stderr)
        return 2
    return run_benchmark(
        "metrics_bench",
        lambda tmp, cleanup: run(args, wrk, tmp, cleanup),
        json_path=args.json,
        keep_tmp=args.keep_tmp,
        errors=(httpx.HTTPError,),
    )


def build_servers(tmp: Path) -> tuple[Server, Server, Server, int]:
    """The upstream, the plain edge as the proxy benchmark runs it (metrics off), and the same
    edge on another port with `EDGE_METRICS_PORT`; and that metrics port."""
    contenders = build_contenders(tmp, None, 1024, False, None)
    upstream, plain = contenders[DIRECT], contenders[EDGE]
    if plain.env is None or "EDGE_METRICS_PORT" in plain.env:
        raise BenchError("the proxy benchmark's plain edge is expected to run without a metrics port")
    off = dataclasses.replace(plain, name=METRICS_OFF, log_path=tmp / "edge-metrics-off.log")
    port, metrics_port = free_port(), free_port()
    on_env = {**plain.env, "EDGE_PORT": str(port), "EDGE_METRICS_PORT": str(metrics_port)}
    on = dataclasses.replace(plain, name=METRICS_ON, port=port, log_path=tmp / "edge-metrics-on.log", env=on_env)
    return upstream, off, on, metrics_port


def scrape(metrics_port: int) -> str:
    response = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10.0)
    response.raise_for_status()
    return response.text


def request_counts(text: str) -> dict[str, float]:
    """`http_server_request_duration_seconds_count` per label set, as `method route status`."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == COUNT_SERIES:
                labels = sample.labels
                key = " ".join(
                    labels.get(name, "?") for name in ("http_request_method", "http_route", "http_response_status_code")
                )
                counts[key] = sample.value
    return counts


def run(args: argparse.Namespace, wrk: str, tmp: Path, cleanup: contextlib.ExitStack) -> tuple[dict[str, Any], int]:
    upstream, off, on, metrics_port = build_servers(tmp)
    upstream.start()
    cleanup.callback(upstream.stop)
    upstream.wait_ready()
    for server in (off, on):
        server.start()
        cleanup.callback(server.stop)
    for server in (off, on):
        server.wait_ready()
    log(
        f"servers: upstream on :{upstream.port}, {METRICS_OFF} on :{off.port}, "
        f"{METRICS_ON} on :{on.port} (metrics on :{metrics_port})"
    )
    machine = machine_info(wrk, None)
    machine.pop("nginx", None)
    # Before any load: the on edge serves its series, the off edge records none.
    before = request_counts(scrape(metrics_port))
    log(f"metrics port answers; request-duration series before the load: {before or 'none yet'}")
    with httpx.Client(timeout=5.0) as client:
        off_metrics = client.get(off.url + "/metrics")
    if COUNT_SERIES in off_metrics.text:
        raise BenchError(f"{METRICS_OFF} serves {COUNT_SERIES} on its public port")

    servers = [off, on]
    if args.warmup > 0:
        for server in servers:
            log(f"warm-up: {server.name} ({args.warmup} s)")
            run_wrk(wrk, server, args.connections, args.warmup)
    rounds: dict[str, list[WrkResult]] = {server.name: [] for server in servers}
    for round_index in range(args.rounds):
        order = servers if round_index % 2 == 0 else servers[::-1]
        for server in order:
            result = run_wrk(wrk, server, args.connections, args.duration)
            rounds[server.name].append(result)
            log(
                f"round {round_index + 1}/{args.rounds} c={args.connections} {server.name:<17} "
                f"{result.requests_per_sec:>9,.0f} req/s  p50 {result.p50_ms:7.3f} ms  "
                f"p99 {result.p99_ms:7.3f} ms  {result.cpu_us_per_request or 0:5.0f} µs CPU/req{error_note(result)}"
            )
    summaries = {name: Summary.of(results) for name, results in rounds.items()}
    for server in servers:
        if server.proc is not None and server.proc.poll() is not None:
            raise BenchError(f"{server.name} exited during the run; see {server.log_path}")

    counts = request_counts(scrape(metrics_port))
    counted = int(sum(counts.values()))
    count_ok = counted >= on.requests_sent
    machine["load_average_at_end"] = os.getloadavg()[0]
    s_off, s_on = summaries[METRICS_OFF], summaries[METRICS_ON]
    ratio = s_on.requests_per_sec / s_off.requests_per_sec
    # Each round's two runs are back to back: their ratio drifts less with the neighbours' load.
    paired = [on_.requests_per_sec / off_.requests_per_sec for on_, off_ in zip(s_on.rounds, s_off.rounds, strict=True)]
    cpu_ratio = (
        s_on.cpu_us_per_request / s_off.cpu_us_per_request
        if s_on.cpu_us_per_request and s_off.cpu_us_per_request
        else None
    )
    clean = s_on.clean and s_off.clean
    verdict = "PASS" if ratio >= GOAL and clean else "FAIL"
    report: dict[str, Any] = {
        "machine": machine,
        "settings": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "connections": args.connections,
            "warmup_s": args.warmup,
        },
        "targets": {name: dataclasses.asdict(summary) for name, summary in summaries.items()},
        "ratio_requests_per_sec_on_off": ratio,
        "ratio_cpu_per_request_on_off": cpu_ratio,
        "ratio_requests_per_sec_on_off_per_round": paired,
        "median_of_round_ratios": statistics.median(paired),
        "goal": f"{METRICS_ON} req/s >= {GOAL:.0%} of {METRICS_OFF}",
        "verdict": verdict,
        "scrape": {
            "request_counts": counts,
            "counted": counted,
            "requests_completed_by_wrk": on.requests_sent,
            "ok": count_ok,
        },
    }
    print(format_report(report, summaries), flush=True)
    return report, 0 if count_ok else 1


def format_report(report: dict[str, Any], summaries: dict[str, Summary]) -> str:
    machine, settings, scraped = report["machine"], report["settings"], report["scrape"]
    out = [
        "",
        f"Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), Python {machine['python']}, "
        f"uvicorn {machine['uvicorn']}, {machine['wrk']}; load average "
        f"{machine['load_average_at_start']:.2f} -> {machine['load_average_at_end']:.2f}; "
        f"edge from {machine['edge_source']}",
        f"wrk -t1 -c{settings['connections']} -d{settings['duration_s']}s --latency, "
        f"{settings['rounds']} interleaved rounds, median per target",
        "",
        f"| target | req/s c={settings['connections']} | min-max | p50 ms | p99 ms | server CPU µs/req | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in summaries.items():
        cpu = f"{s.cpu_us_per_request:.0f}" if s.cpu_us_per_request is not None else "-"
        out.append(
            f"| {name} | {s.requests_per_sec:,.0f} | {s.min_requests_per_sec:,.0f}-{s.max_requests_per_sec:,.0f} "
            f"| {s.p50_ms:.3f} | {s.p99_ms:.3f} | {cpu} | {s.socket_errors + s.non_2xx} |"
        )
    cpu_ratio = report["ratio_cpu_per_request_on_off"]
    each_round = ", ".join(f"{r:.1%}" for r in report["ratio_requests_per_sec_on_off_per_round"])
    out += [
        "",
        "| ratio, metrics on / off | value |",
        "|---|---:|",
        f"| req/s (median) | {report['ratio_requests_per_sec_on_off']:.1%} |",
        f"| server CPU per request (median) | {cpu_ratio:.1%} |" if cpu_ratio is not None else "| CPU | - |",
        f"| req/s, median of the rounds' ratios | {report['median_of_round_ratios']:.1%} |",
        f"| req/s, each round's ratio | {each_round} |",
        "",
        f"goal: {report['goal']}: {report['ratio_requests_per_sec_on_off']:.1%}: {report['verdict']}",
        f"scrape: {scraped['counted']:,} requests counted, wrk completed {scraped['requests_completed_by_wrk']:,} "
        f"against {METRICS_ON}: {'ok' if scraped['ok'] else 'SHORT'} ({scraped['request_counts']})",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
