"""Prometheus metrics of a process (docs/metrics.md): a registry of its own, served on an
internal port, never the public one.

- Each process (and each test's edge or app) has its own `CollectorRegistry`: several run
  in one test process, and none may see another's series.
- With several workers (`EDGE_WORKERS` > 1) every worker writes its values to memory-mapped
  files in `PROMETHEUS_MULTIPROC_DIR` (prometheus-client's multiprocess mode, chosen when
  the library is imported, so the supervisor sets the variable before it starts them) and
  the supervisor serves their sum: `supervisor_registry`.
- `process_*` covers the process and its children; `container_memory_*` the cgroup it runs
  in, so that memory is measured against the container's limit, not the host's.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Histogram, multiprocess, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROCESS_DIRECTORY = "PROMETHEUS_MULTIPROC_DIR"
# OpenTelemetry's advice for http.server.request.duration, and 15 to 60 s for voice turns.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 15, 30, 60)
# Request methods as OpenTelemetry names them; anything else is `_OTHER` (bounded labels).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "_OTHER"


def route_template(scope: Scope) -> str:
    """The route Starlette's router matched (`/api/v1/sessions/{session_id}`), else `other`."""
    route = getattr(scope.get("route"), "path", None)
    return route if isinstance(route, str) else "other"


def request_duration(registry: CollectorRegistry) -> Histogram:
    return Histogram(
        "http_server_request_duration_seconds",
        "Duration of HTTP server requests, from the request's head to the response's last byte",
        ["http_request_method", "http_route", "http_response_status_code"],
        buckets=DURATION_BUCKETS,
        registry=registry,
    )


class RequestDurationMiddleware:
    """`http_server_request_duration_seconds` for every HTTP request, from its head to the
    response's last byte, labelled by `route_of(scope)` once the request is done (a route
    template, never the raw path). A request whose response never started (the client went
    away) is not counted; one that failed before answering counts as 500, which is what
    the server sends. `finished(scope)`, if given, is told of every HTTP request and
    WebSocket session when it ends: one layer for whatever else a process counts per request.

    The labelled series are kept once found: the label sets are bounded, and looking one
    up in prometheus-client costs as much as the observation itself (docs/benchmarks.md).
    With `exemplars`, an observation made inside a recorded span carries its trace id as an
    exemplar (shown in the OpenMetrics format Prometheus asks for when it stores them), so
    a dashboard links a slow request to its trace."""

    def __init__(
        self,
        app: ASGIApp,
        duration: Histogram,
        route_of: Callable[[Scope], str],
        finished: Callable[[Scope], None] | None = None,
        exemplars: bool = False,
    ) -> None:
        self.app = app
        self.duration = duration
        self.route_of = route_of
        self.finished = finished
        self.exemplars = exemplars
        self.series: dict[tuple[str, str, int], Histogram] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            try:
                await self.app(scope, receive, send)
            finally:
                if self.finished is not None and scope["type"] == "websocket":
                    self.finished(scope)
            return
        started = time.perf_counter()
        status = 0

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        except Exception:
            status = status or 500
            raise
        finally:
            if self.finished is not None:
                self.finished(scope)
            if status:
                key = (scope["method"], self.route_of(scope), status)
                series = self.series.get(key)
                if series is None:
                    series = self.series[key] = self.duration.labels(method_label(key[0]), key[1], str(status))
                series.observe(time.perf_counter() - started, self._exemplar() if self.exemplars else None)

    @staticmethod
    def _exemplar() -> dict[str, str] | None:
        span = trace.get_current_span()
        if not span.is_recording():  # a trace nobody exports is nothing to link to
            return None
        return {"trace_id": format(span.get_span_context().trace_id, "032x")}


def process_registry() -> CollectorRegistry:
    """A registry for one process's own series, with its process and container collectors."""
    registry = CollectorRegistry()
    registry.register(ProcessTreeCollector())
    registry.register(ContainerMemoryCollector())
    return registry


def supervisor_registry(directory: Path) -> CollectorRegistry:
    """What a supervisor serves: its workers' series added up, and its process tree."""
    registry = CollectorRegistry()
    registry.register(WorkersCollector(directory))
    registry.register(ProcessTreeCollector())
    registry.register(ContainerMemoryCollector())
    return registry


@dataclass
class MetricsServer:
    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """`/metrics` (any path, as prometheus-client answers) on its own port, in a thread."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)


class WorkersCollector(Collector):
    """The workers' files added up; the live gauges of workers that died are dropped first
    (their counters stay: what they counted happened)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # prometheus-client's multiprocess module has no type hints.
        self.files = multiprocess.MultiProcessCollector(None, path=str(directory))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        for file in self.directory.glob("gauge_live*_*.db"):
            pid = int(file.stem.rsplit("_", 1)[1])
            if not _alive(pid):
                multiprocess.mark_process_dead(pid, str(self.directory))  # type: ignore[no-untyped-call]
        found: Iterable[Metric] = self.files.collect()  # type: ignore[no-untyped-call]
        return found


class ProcessTreeCollector(Collector):
    """Resident memory and CPU time of this process and its descendants (the edge's
    workers), read from /proc."""

    def collect(self) -> Iterator[Metric]:
        memory, cpu = 0, 0.0
        for pid in (os.getpid(), *_descendants(os.getpid())):
            try:
                memory += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError, ValueError):
                continue  # gone since it was listed
            cpu += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
        yield GaugeMetricFamily(
            "process_resident_memory_bytes", "Resident memory of the process and its children", value=memory
        )
        yield CounterMetricFamily("process_cpu_seconds", "CPU time of the process and its children", value=cpu)


class ContainerMemoryCollector(Collector):
    """The memory of the cgroup (v2) the process runs in, against its limit: what the
    kernel's OOM killer goes by. Nothing outside a cgroup v2 hierarchy; no limit series
    when the cgroup has none (`max`)."""

    def __init__(self, root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> None:
        self.root = root
        self.membership = membership

    def collect(self) -> Iterator[Metric]:
        group = self._group()
        if group is None:
            return
        try:
            usage = int((group / "memory.current").read_text())
            stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
            limit = (group / "memory.max").read_text().strip()
        except (OSError, ValueError):
            return
        # The working set: what cannot be dropped under pressure (cAdvisor's definition).
        working_set = max(0, usage - int(stat.get("inactive_file", 0)))
        yield GaugeMetricFamily(
            "container_memory_working_set_bytes",
            "Memory of the process's container less its inactive file cache",
            value=working_set,
        )
        if limit != "max":
            yield GaugeMetricFamily("container_memory_limit_bytes", "The container's memory limit", value=int(limit))

    def _group(self) -> Path | None:
        try:
            lines = self.membership.read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            hierarchy, _, path = line.partition("::")
            if hierarchy == "0":  # the unified (v2) hierarchy
                group = self.root / path.lstrip("/")
                return group if (group / "memory.current").exists() else None
        return None


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    pending = list(children.get(pid, ()))
    while pending:
        child = pending.pop()
        found.append(child)
        pending.extend(children.get(child, ()))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
