"""The proxy benchmark's report: the machine, the ratios between contenders and the targets'
outcomes, as JSON (`--json`) and as the text printed at the end of a run."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.proxy.checks import AccessLog
from bench.proxy.contenders import DIRECT, EDGE, EDGE_ALL_MEMORY, EDGE_ALL_REDIS, NAIVE, NGINX, NGINX_EQUIVALENT, ORIGIN
from bench.proxy.targets import Measurements, Outcome
from bench.support import MIB, ROOT, machine


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


def build_report(
    args: argparse.Namespace,
    machine: dict[str, Any],
    run: Measurements,
    outcomes: list[Outcome],
    headers: dict[str, Any] | None,
    access_logs: list[AccessLog],
    notes: list[str],
) -> dict[str, Any]:
    loaded, single = run.loaded, run.single

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
    added_latency_ms = {name: run.added_latency_ms(name) for name in single if name != DIRECT}
    for name in loaded:
        if not run.clean(name):
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
        "edge_added_latency_ms": added_latency_ms[EDGE],
        "nginx_added_latency_ms": added_latency_ms.get(NGINX),
        "ratios": ratios,
        "memory": asdict(run.memory) if run.memory else None,
        "headers": headers,
        "access_logs": [asdict(entry) for entry in access_logs],
        "targets": [asdict(outcome) for outcome in outcomes],
        "notes": notes,
    }


def format_report(report: dict[str, Any], run: Measurements, outcomes: list[Outcome]) -> str:
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
    for name, summary in run.loaded.items():
        c1 = run.single.get(name)
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
    if run.memory is not None:
        out.append(f"edge idle RSS before the transfers: {run.memory.baseline_rss_mib:.1f} MiB")
        for transfer in run.memory.transfers:
            out.append(
                f"  {transfer.direction:<8} {transfer.expected_bytes / MIB:.0f} MiB: peak RSS "
                f"{transfer.peak_rss_mib:.1f} MiB (+{transfer.growth_mib:.1f} MiB), "
                f"status {transfer.status}, {transfer.counted_bytes} bytes counted "
                f"({'ok' if transfer.bytes_ok else 'WRONG'}), "
                f"{transfer.expected_bytes / MIB / transfer.seconds:.0f} MiB/s"
            )
    out.append("")
    out.append("Targets:")
    out.extend(f"  {outcome.line()}" for outcome in outcomes)
    for note in report["notes"]:
        out.append(f"Note: {note}")
    return "\n".join(out)
