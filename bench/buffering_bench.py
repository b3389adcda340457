"""Request buffering, measured: the edge with `EDGE_REQUEST_BUFFER_BYTES=65536` (the default)
against the same edge with `EDGE_REQUEST_BUFFER_BYTES=0` (every body streams), in one run.

Each edge is a subprocess (`python -m edge`, one worker, rate limiting and access log off,
`EDGE_LOG_LEVEL=warning`, the per-client caps `EDGE_MAX_EXCHANGES_PER_CLIENT` and
`EDGE_MAX_CONNECTIONS_PER_CLIENT` raised to 10000 so that only buffering is measured, the
upstream pool at its default 100) in front of its own bench/tiny_upstream.py. Every round
starts a fresh pair of edges (so each round's memory figures are a new process's) and runs,
interleaved between the two edges (the order swapped every round):

1. slow senders: N senders (150, from 127.0.0.1) each send `POST /upload` with
   `Content-Length: 16384` and trickle the body at 2 KiB/s (512 B every 0.25 s, about 8 s;
   above the edge's minimum body rate of 1 KiB/s). While they trickle (from the last
   sender's head to the first sender's last chunk), a probe client bound to 127.0.0.2
   sends `POST /upload` with 1 KiB bodies one after another on a keep-alive connection:
   its statuses and latencies, the senders' outcomes, the upstream connections open at
   once (ESTABLISHED sockets to the upstream's port in /proc/net/tcp) and the edge's RSS;
2. memory: N clients (200) each send `POST /upload` with a 60 KiB body slowly (4 KiB every
   0.25 s); each holds back its last 4 KiB until all of them have sent the rest, so up to
   N x 60 KiB are inside the edge at once. The edge's peak RSS over the fresh edge's idle RSS;
3. fast clients: `wrk -t1 -c50 -d4s --latency` with a Lua script (`POST /upload`, a 1 KiB
   and a 32 KiB body), after an untimed 1 s warm-up of each: req/s, p50/p99 and the edge's
   CPU per request.

Prints progress lines, then Markdown tables; `--json PATH` writes everything, per-round
numbers included. Exit status 0, or 2 when the benchmark itself cannot run.

Run: `.venv/bin/python bench/buffering_bench.py [--rounds 3 --senders 150 --duration 4 ...]`.
Results are described in docs/benchmarks.md ("Slow senders and request buffering").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.proxy.contenders import LOAD_GENERATOR_CAPS, Server, bench_env, edge_env
from bench.proxy.procfs import rss_kib
from bench.proxy.report import machine_info
from bench.proxy.wrk import Summary, WrkResult, error_note, parse_wrk, wrk_argv
from bench.support import BENCH_DIR, BenchError, free_port, log, percentile, run_benchmark

KIB = 1024
BUFFERED = "buffered (64 KiB)"
STREAMING = "streaming (0)"
BUFFER_BYTES = {BUFFERED: 64 * KIB, STREAMING: 0}
# Only buffering is measured: one address must be able to open every connection it needs.

# Slow senders: 16 KiB at 2 KiB/s, twice the edge's minimum body rate (1 KiB/s).
SLOW_BODY_BYTES = 16 * KIB
SLOW_CHUNK_BYTES = 512
SLOW_INTERVAL_S = 0.25
PROBE_BODY_BYTES = 1 * KIB
PROBE_ADDRESS = "127.0.0.2"
# Memory: 60 KiB each, 4 KiB every 0.25 s (16 KiB/s), the last 4 KiB held back until all are in.
MEMORY_BODY_BYTES = 60 * KIB
MEMORY_CHUNK_BYTES = 4 * KIB
MEMORY_INTERVAL_S = 0.25
# Fast clients: wrk's bodies.
WRK_BODIES = (1 * KIB, 32 * KIB)

START_SPREAD_S = 0.5  # the clients of a phase connect over this long, not in one burst
CONNECT_TIMEOUT_S = 10.0
RESPONSE_TIMEOUT_S = 30.0  # above the edge's pool wait (5 s) and body timeout (10 s)
GATE_TIMEOUT_S = 10.0
SAMPLE_INTERVAL_S = 0.05
# The edge drops idle upstream connections older than EDGE_UPSTREAM_IDLE_TIMEOUT (4 s) when
# it next takes one; before a slow-sender phase the edge has been idle this long, and one
# request then clears its pool, so the phase starts with one upstream connection open.
POOL_SETTLE_S = 4.5
EDGE_STATUS_TIMEOUT_S = 10.0


# -- servers ---------------------------------------------------------------------------------


@dataclass
class Contender:
    """One edge setting and its own upstream (so the upstream connections counted are the
    edge's). A fresh edge process is started for every round: each round's memory figure is
    that of a new process, not of one whose heap earlier rounds have already grown."""

    name: str
    buffer_bytes: int
    upstream: Server
    tmp: Path
    edge_process: Server | None = None
    last_active: float = 0.0

    @property
    def edge(self) -> Server:
        if self.edge_process is None:
            raise BenchError(f"the {self.name} edge is not running")
        return self.edge_process

    def start_edge(self, round_index: int) -> Server:
        stem = "buffered" if self.buffer_bytes else "streaming"
        port = free_port()
        self.edge_process = Server(
            f"edge, {self.name}",
            [sys.executable, "-m", "edge"],
            port,
            self.tmp / f"edge-{stem}-round{round_index + 1}.log",
            env=edge_env(
                self.upstream.url,
                port,
                {
                    "EDGE_LOG_LEVEL": "warning",
                    "EDGE_ACCESS_LOG": "false",
                    "EDGE_RATE_LIMIT_DEFAULT": "off",
                    "EDGE_REQUEST_BUFFER_BYTES": str(self.buffer_bytes),
                },
            ),
        )
        self.edge_process.start()
        self.last_active = 0.0  # a fresh pool: nothing to let go stale
        return self.edge_process

    def stop_edge(self) -> None:
        if self.edge_process is not None:
            self.edge_process.stop()
            self.edge_process = None

    def rss_mib(self) -> float:
        return rss_kib(self.edge.pid) / KIB

    def settle_pool(self) -> int:
        """Waits until the pool's idle connections are stale, clears them; the number left open."""
        wait = self.last_active + POOL_SETTLE_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        status, _ = http_request(self.edge.port, "GET", "/", b"")
        if status != 200:
            raise BenchError(f"{self.name}: GET / answered {status}")
        time.sleep(0.1)
        return upstream_connections(self.upstream.port)


def build_contenders(tmp: Path) -> list[Contender]:
    contenders = []
    for name, buffer_bytes in BUFFER_BYTES.items():
        stem = "buffered" if buffer_bytes else "streaming"
        port = free_port()
        upstream = Server(
            f"upstream of {name}",
            [sys.executable, str(BENCH_DIR / "tiny_upstream.py"), "--port", str(port)],
            port,
            tmp / f"upstream-{stem}.log",
            env=bench_env({}),
        )
        contenders.append(Contender(name, buffer_bytes, upstream, tmp))
    return contenders


def http_request(port: int, method: str, path: str, body: bytes) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=EDGE_STATUS_TIMEOUT_S)
    try:
        connection.request(method, path, body=body or None)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def check_uploads(contenders: list[Contender]) -> None:
    """Every body size used here goes through each edge whole (the upstream answers the count)."""
    for contender in contenders:
        for size in (PROBE_BODY_BYTES, SLOW_BODY_BYTES, *WRK_BODIES, MEMORY_BODY_BYTES, 256 * KIB):
            status, body = http_request(contender.edge.port, "POST", "/upload", b"x" * size)
            if status != 200 or body != str(size).encode():
                raise BenchError(f"{contender.name}: POST /upload of {size} bytes answered {status} {body[:80]!r}")


def upstream_connections(port: int) -> int:
    """ESTABLISHED IPv4 sockets whose remote port is `port`: the edge's side of its upstream connections."""
    suffix = f":{port:04X}"
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] == "01" and fields[2].endswith(suffix):
                count += 1
    return count


# -- raw HTTP/1.1 clients --------------------------------------------------------------------


def upload_head(length: int) -> bytes:
    return (
        b"POST /upload HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/octet-stream\r\n"
        b"content-length: %d\r\n\r\n" % length
    )


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status, body (`Content-Length` framed) and whether the server closes the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    closes = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"connection":
            closes = value.strip().lower() == b"close"
    body = await reader.readexactly(length) if length else b""
    return status, body, closes


CLIENT_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError, IndexError)


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        writer.close()


@dataclass
class Marks:
    """Moments of a phase, shared by its clients."""

    total: int
    loop_start: float
    heads_sent: int = 0
    all_heads_sent: asyncio.Event = field(default_factory=asyncio.Event)
    all_heads_sent_at: float | None = None
    first_last_chunk_at: float | None = None
    trickle_over: asyncio.Event = field(default_factory=asyncio.Event)  # a client is sending its last chunk
    # The memory phase's gate: every client has sent all but its last chunk (or has ended).
    held: int = 0
    all_held: asyncio.Event = field(default_factory=asyncio.Event)

    def head_sent(self) -> None:
        self.heads_sent += 1
        if self.heads_sent == self.total:
            self.all_heads_sent_at = time.monotonic()
            self.all_heads_sent.set()

    def last_chunk(self) -> None:
        if self.first_last_chunk_at is None:
            self.first_last_chunk_at = time.monotonic()
            self.trickle_over.set()

    def hold(self) -> None:
        self.held += 1
        if self.held == self.total:
            self.all_held.set()


async def send_slowly(
    port: int, total: int, chunk_bytes: int, interval: float, delay: float, marks: Marks, *, gate: bool
) -> str:
    """One slow client; returns its outcome: the status, with `(wrong count)` when 200 did not
    count the whole body, or the error that ended it."""
    await asyncio.sleep(delay)
    held = False
    head_counted = False
    connection: asyncio.StreamWriter | None = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), CONNECT_TIMEOUT_S)
        connection = writer
        response = asyncio.ensure_future(read_response(reader))
        try:
            writer.write(upload_head(total))
            marks.head_sent()
            head_counted = True
            chunk = b"x" * chunk_bytes
            chunks = total // chunk_bytes
            started = time.monotonic()
            for index in range(chunks):
                last = index == chunks - 1
                if last and gate:
                    marks.hold()
                    held = True
                    await asyncio.wait_for(marks.all_held.wait(), GATE_TIMEOUT_S)
                else:
                    await asyncio.sleep(max(0.0, started + index * interval - time.monotonic()))
                if response.done():
                    break  # answered before the body was sent (503, 408): stop sending
                if last:
                    marks.last_chunk()
                writer.write(chunk)
                await writer.drain()
            status, body, _ = await asyncio.wait_for(response, RESPONSE_TIMEOUT_S)
        except CLIENT_ERRORS:
            # Writing fails once the edge has answered and closed: its answer counts, if it came.
            if response.done() and not response.cancelled() and response.exception() is None:
                status, body, _ = response.result()
            else:
                response.cancel()
                raise
        if status == 200 and body != str(total).encode():
            return "200 (wrong count)"
        return str(status)
    except CLIENT_ERRORS as exc:
        return f"error: {type(exc).__name__}"
    finally:
        if not head_counted:
            marks.head_sent()
        if gate and not held:
            marks.hold()
        if connection is not None:
            _close(connection)


@dataclass
class Probe:
    status: int | None
    latency_ms: float
    error: str | None


async def probe_loop(port: int, start: asyncio.Event, stop: asyncio.Event) -> list[Probe]:
    """Small uploads from another address, one after another on a keep-alive connection."""
    await start.wait()
    request = upload_head(PROBE_BODY_BYTES) + b"x" * PROBE_BODY_BYTES
    probes: list[Probe] = []
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while not stop.is_set():
        started = time.perf_counter()
        status: int | None = None
        error: str | None = None
        try:
            if connection is None:
                connection = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, local_addr=(PROBE_ADDRESS, 0)), CONNECT_TIMEOUT_S
                )
            reader, writer = connection
            writer.write(request)
            await writer.drain()
            status, body, closes = await asyncio.wait_for(read_response(reader), RESPONSE_TIMEOUT_S)
            if status == 200 and body != str(PROBE_BODY_BYTES).encode():
                error = "wrong count"
            if closes:
                _close(writer)
                connection = None
        except CLIENT_ERRORS as exc:
            error = type(exc).__name__
            if connection is not None:
                _close(connection[1])
                connection = None
            await asyncio.sleep(0.05)  # no busy loop against a refusing edge
        probes.append(Probe(status, (time.perf_counter() - started) * 1000, error))
    if connection is not None:
        _close(connection[1])
    return probes


@dataclass
class Samples:
    times: list[float] = field(default_factory=list)
    upstream_open: list[int] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)


async def sample_loop(contender: Contender, stop: asyncio.Event, samples: Samples) -> None:
    while True:
        samples.times.append(time.monotonic())
        samples.upstream_open.append(upstream_connections(contender.upstream.port))
        samples.rss_kib.append(rss_kib(contender.edge.pid))
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL_S)


# -- 1. slow senders vs. a normal client -----------------------------------------------------


@dataclass
class SlowRound:
    round: int
    seconds: float
    probe_window_s: float  # while the senders trickled: the last head sent to the first last chunk
    probes_sent: int
    probes_200: int
    probes_503: int
    probes_other: int  # another status, a wrong count or an error
    probe_p50_ms: float | None
    probe_p99_ms: float | None
    probe_max_ms: float | None
    probe_outcomes: dict[str, int]
    sender_outcomes: dict[str, int]
    upstream_open_at_start: int
    upstream_open_peak_while_trickling: int  # until the first sender's last chunk
    upstream_open_peak: int  # the whole phase, the end's burst of complete bodies included
    rss_before_mib: float
    rss_peak_mib: float
    rss_growth_mib: float


async def _slow_phase(contender: Contender, senders: int) -> tuple[list[str], list[Probe], Samples, Marks]:
    port = contender.edge.port
    marks = Marks(total=senders, loop_start=time.monotonic())
    samples = Samples()
    stop_sampling = asyncio.Event()
    sampler = asyncio.ensure_future(sample_loop(contender, stop_sampling, samples))
    # The probe runs while the senders trickle: from the last sender's head to the first
    # sender's last chunk (the request it has in flight then is still waited for).
    prober = asyncio.ensure_future(probe_loop(port, marks.all_heads_sent, marks.trickle_over))
    outcomes = await asyncio.gather(
        *(
            send_slowly(
                port,
                SLOW_BODY_BYTES,
                SLOW_CHUNK_BYTES,
                SLOW_INTERVAL_S,
                START_SPREAD_S * index / senders,
                marks,
                gate=False,
            )
            for index in range(senders)
        )
    )
    marks.all_heads_sent.set()  # in case a sender never got its head out
    marks.trickle_over.set()  # in case every sender ended before its last chunk
    probes = await prober
    stop_sampling.set()
    await sampler
    return outcomes, probes, samples, marks


def measure_slow_senders(contender: Contender, senders: int, round_index: int) -> tuple[SlowRound, list[float]]:
    open_at_start = contender.settle_pool()
    rss_before = contender.rss_mib()
    started = time.monotonic()
    outcomes, probes, samples, marks = asyncio.run(_slow_phase(contender, senders))
    seconds = time.monotonic() - started
    contender.last_active = time.monotonic()
    latencies = [probe.latency_ms for probe in probes]
    probe_outcomes = Counter(
        probe.error if probe.error else str(probe.status) for probe in probes
    )  # "200", "503", "wrong count", "TimeoutError"...
    trickle_end = marks.first_last_chunk_at or samples.times[-1]
    trickle_start = marks.all_heads_sent_at or samples.times[0]
    trickling = [
        n for t, n in zip(samples.times, samples.upstream_open, strict=True) if trickle_start <= t <= trickle_end
    ]
    ok = sum(1 for probe in probes if probe.status == 200 and probe.error is None)
    unavailable = sum(1 for probe in probes if probe.status == 503 and probe.error is None)
    result = SlowRound(
        round=round_index + 1,
        seconds=seconds,
        probe_window_s=trickle_end - trickle_start,
        probes_sent=len(probes),
        probes_200=ok,
        probes_503=unavailable,
        probes_other=len(probes) - ok - unavailable,
        probe_p50_ms=percentile(latencies, 0.50) if latencies else None,
        probe_p99_ms=percentile(latencies, 0.99) if latencies else None,
        probe_max_ms=max(latencies) if latencies else None,
        probe_outcomes=dict(probe_outcomes),
        sender_outcomes=dict(Counter(outcomes)),
        upstream_open_at_start=open_at_start,
        upstream_open_peak_while_trickling=max(trickling, default=0),
        upstream_open_peak=max(samples.upstream_open, default=0),
        rss_before_mib=rss_before,
        rss_peak_mib=max(samples.rss_kib) / KIB,
        rss_growth_mib=max(samples.rss_kib) / KIB - rss_before,
    )
    return result, latencies


# -- 3. memory under slow 60 KiB bodies ------------------------------------------------------


@dataclass
class MemoryRound:
    round: int
    seconds: float
    outcomes: dict[str, int]
    rss_before_mib: float
    rss_peak_mib: float
    rss_growth_mib: float
    upstream_open_peak: int


async def _memory_phase(contender: Contender, clients: int) -> tuple[list[str], Samples]:
    port = contender.edge.port
    marks = Marks(total=clients, loop_start=time.monotonic())
    samples = Samples()
    stop_sampling = asyncio.Event()
    sampler = asyncio.ensure_future(sample_loop(contender, stop_sampling, samples))
    outcomes = await asyncio.gather(
        *(
            send_slowly(
                port,
                MEMORY_BODY_BYTES,
                MEMORY_CHUNK_BYTES,
                MEMORY_INTERVAL_S,
                START_SPREAD_S * index / clients,
                marks,
                gate=True,
            )
            for index in range(clients)
        )
    )
    stop_sampling.set()
    await sampler
    return outcomes, samples


def measure_memory(contender: Contender, clients: int, round_index: int, idle_rss: float) -> MemoryRound:
    """Peak RSS growth over the fresh edge's idle RSS (the slow senders ran on it first and
    may have left their memory in its heap: what they left is not counted twice)."""
    rss_before = contender.rss_mib()
    started = time.monotonic()
    outcomes, samples = asyncio.run(_memory_phase(contender, clients))
    contender.last_active = time.monotonic()
    peak = max(samples.rss_kib) / KIB
    return MemoryRound(
        round=round_index + 1,
        seconds=time.monotonic() - started,
        outcomes=dict(Counter(outcomes)),
        rss_before_mib=rss_before,
        rss_peak_mib=peak,
        rss_growth_mib=peak - idle_rss,
        upstream_open_peak=max(samples.upstream_open, default=0),
    )


# -- 2. fast clients (wrk) -------------------------------------------------------------------


def write_wrk_script(tmp: Path, body_bytes: int) -> Path:
    script = tmp / f"post-{body_bytes}.lua"
    # wrk sets Content-Length from wrk.body.
    script.write_text(f'wrk.method = "POST"\nwrk.body = string.rep("x", {body_bytes})\n')
    return script


def run_wrk_post(wrk: str, contender: Contender, script: Path, connections: int, duration: int) -> WrkResult:
    """proxy_bench's wrk command line, with the Lua script and `/upload` as the target."""
    argv = wrk_argv(wrk, contender.edge.url, connections, duration)
    assert argv[-1] == contender.edge.url + "/"
    argv[-1:] = ["-s", str(script), contender.edge.url + "/upload"]
    cpu_before = contender.edge.cpu_seconds()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    cpu_used = contender.edge.cpu_seconds() - cpu_before
    contender.last_active = time.monotonic()
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    result = parse_wrk(done.stdout)
    if result.requests:
        result.cpu_us_per_request = cpu_used / result.requests * 1e6
    return result


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Results:
    slow: dict[str, list[SlowRound]]
    slow_latencies: dict[str, list[float]]
    memory: dict[str, list[MemoryRound]]
    wrk: dict[int, dict[str, list[WrkResult]]]
    idle_rss_mib: dict[str, list[float]]  # each round's fresh edge, before the memory phase
    notes: list[str] = field(default_factory=list)


def _outcomes(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} x {what}" for what, count in sorted(counts.items(), key=lambda kv: -kv[1]))


def start_edges(contenders: list[Contender], round_index: int) -> None:
    for contender in contenders:
        contender.start_edge(round_index)
    for contender in contenders:
        contender.edge.wait_ready()
    check_uploads(contenders)  # also runs every code path of an upload once before the measurements


def run_rounds(wrk: str, contenders: list[Contender], scripts: dict[int, Path], args: argparse.Namespace) -> Results:
    width = max(len(c.name) for c in contenders)
    results = Results(
        slow={c.name: [] for c in contenders},
        slow_latencies={c.name: [] for c in contenders},
        memory={c.name: [] for c in contenders},
        wrk={size: {c.name: [] for c in contenders} for size in scripts},
        idle_rss_mib={c.name: [] for c in contenders},
    )
    for round_index in range(args.rounds):
        order = contenders if round_index % 2 == 0 else contenders[::-1]
        tag = f"round {round_index + 1}/{args.rounds}"
        start_edges(order, round_index)
        for contender in order:
            results.idle_rss_mib[contender.name].append(contender.rss_mib())
        log(
            f"{tag} fresh edges: "
            + ", ".join(f"{c.name} on :{c.edge.port} (pid {c.edge.pid}, {c.rss_mib():.1f} MiB)" for c in order)
        )
        for contender in order:
            slow, latencies = measure_slow_senders(contender, args.senders, round_index)
            results.slow[contender.name].append(slow)
            results.slow_latencies[contender.name].extend(latencies)
            log(
                f"{tag} slow    {contender.name:<{width}} probes {slow.probes_sent}: {_outcomes(slow.probe_outcomes)}; "
                f"p50 {slow.probe_p50_ms or 0:.1f} ms p99 {slow.probe_p99_ms or 0:.1f} ms; "
                f"upstream conns {slow.upstream_open_at_start} -> {slow.upstream_open_peak_while_trickling} "
                f"(peak {slow.upstream_open_peak}); RSS +{slow.rss_growth_mib:.1f} MiB; "
                f"senders: {_outcomes(slow.sender_outcomes)}; {slow.seconds:.1f} s"
            )
        for contender in order:
            memory = measure_memory(
                contender, args.memory_clients, round_index, results.idle_rss_mib[contender.name][-1]
            )
            results.memory[contender.name].append(memory)
            log(
                f"{tag} memory  {contender.name:<{width}} {args.memory_clients} x 60 KiB: RSS "
                f"{memory.rss_before_mib:.1f} -> {memory.rss_peak_mib:.1f} MiB "
                f"(+{memory.rss_growth_mib:.1f} over idle), "
                f"upstream conns peak {memory.upstream_open_peak}, {memory.seconds:.1f} s; {_outcomes(memory.outcomes)}"
            )
        if args.warmup > 0:
            for contender in order:
                for script in scripts.values():
                    run_wrk_post(wrk, contender, script, args.connections, args.warmup)
            log(f"{tag} wrk warm-up: {args.warmup} s per edge and body, untimed")
        for size, script in scripts.items():
            for contender in order:
                result = run_wrk_post(wrk, contender, script, args.connections, args.duration)
                results.wrk[size][contender.name].append(result)
                log(
                    f"{tag} wrk {size // KIB:>2} KiB {contender.name:<{width}} {result.requests_per_sec:>8,.0f} req/s  "
                    f"p50 {result.p50_ms:7.3f} ms  p99 {result.p99_ms:7.3f} ms  "
                    f"CPU {result.cpu_us_per_request or 0:.0f} us/req{error_note(result)}"
                )
        for contender in order:
            proc = contender.edge.proc
            if proc is not None and proc.poll() is not None:
                results.notes.append(f"{contender.name} edge exited during round {round_index + 1}; see its log")
            contender.stop_edge()
    return results


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(results: Results) -> dict[str, Any]:
    slow: dict[str, Any] = {}
    for name, rounds in results.slow.items():
        latencies = results.slow_latencies[name]
        sent = sum(r.probes_sent for r in rounds)
        ok = sum(r.probes_200 for r in rounds)
        senders: Counter[str] = Counter()
        for r in rounds:
            senders.update(r.sender_outcomes)
        slow[name] = {
            "probes_sent": sent,
            "probes_200": ok,
            "probes_503": sum(r.probes_503 for r in rounds),
            "probes_other": sum(r.probes_other for r in rounds),
            "share_200": ok / sent if sent else None,
            "probe_p50_ms": percentile(latencies, 0.50) if latencies else None,
            "probe_p99_ms": percentile(latencies, 0.99) if latencies else None,
            "probe_max_ms": max(latencies) if latencies else None,
            "probe_window_s": sum(r.probe_window_s for r in rounds),
            "sender_outcomes": dict(senders),
            "upstream_open_peak_while_trickling": max(r.upstream_open_peak_while_trickling for r in rounds),
            "upstream_open_peak": max(r.upstream_open_peak for r in rounds),
            "rss_growth_mib_max": max(r.rss_growth_mib for r in rounds),
        }
    memory: dict[str, Any] = {}
    for name, mem_rounds in results.memory.items():
        outcomes: Counter[str] = Counter()
        for m in mem_rounds:
            outcomes.update(m.outcomes)
        memory[name] = {
            "rss_growth_mib_max": max(m.rss_growth_mib for m in mem_rounds),
            "rss_growth_mib_min": min(m.rss_growth_mib for m in mem_rounds),
            "rss_growth_mib_median": statistics.median(m.rss_growth_mib for m in mem_rounds),
            "idle_rss_mib_median": statistics.median(results.idle_rss_mib[name]),
            "outcomes": dict(outcomes),
        }
    wrk: dict[str, Any] = {}
    for size, by_name in results.wrk.items():
        summaries = {name: Summary.of(rounds) for name, rounds in by_name.items()}
        buffered, streaming = summaries[BUFFERED], summaries[STREAMING]
        wrk[str(size)] = {
            "contenders": {name: asdict(summary) for name, summary in summaries.items()},
            "buffered_over_streaming": {
                "requests_per_sec": _ratio(buffered.requests_per_sec, streaming.requests_per_sec),
                "p50_ms": _ratio(buffered.p50_ms, streaming.p50_ms),
                "p99_ms": _ratio(buffered.p99_ms, streaming.p99_ms),
                "cpu_us_per_request": _ratio(buffered.cpu_us_per_request, streaming.cpu_us_per_request),
            },
        }
    return {"slow_senders": slow, "memory": memory, "fast_clients": wrk}


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return f"{value:.1%}" if value is not None else "-"


def format_report(report: dict[str, Any]) -> str:
    settings = report["settings"]
    summary = report["summary"]
    out = [""]
    m = report["machine"]
    out.append(
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, Python {m['python']}, "
        f"uvicorn {m['uvicorn']}, {m['wrk']}; load average {m['load_average_at_start']} -> "
        f"{m['load_average_at_end']}; edge from {m['edge_source']}"
    )
    out.append(
        f"{settings['rounds']} interleaved rounds; both edges with EDGE_MAX_EXCHANGES_PER_CLIENT and "
        f"EDGE_MAX_CONNECTIONS_PER_CLIENT = {LOAD_GENERATOR_CAPS['EDGE_MAX_EXCHANGES_PER_CLIENT']} "
        "(only buffering is measured), "
        "EDGE_UPSTREAM_POOL_SIZE 100 (default)"
    )
    out.append("")
    out.append(
        f"Slow senders: {settings['senders']} x POST /upload, 16 KiB at 2 KiB/s from 127.0.0.1; probe: 1 KiB "
        "uploads one after another from 127.0.0.2 (all rounds together)"
    )
    out.append("")
    out.append(
        "| edge | probes sent (in s of trickling) | answered 200 | 503 | other | probe p50 ms | p99 ms | max ms "
        "| slow senders answered 200 | upstream conns open, peak while trickling | peak, whole phase "
        "| RSS growth, max |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in summary["slow_senders"].items():
        senders_total = sum(s["sender_outcomes"].values())
        share = f"{s['share_200']:.1%}" if s["share_200"] is not None else "-"
        out.append(
            f"| {name} | {s['probes_sent']:,} ({s['probe_window_s']:.1f} s) | {s['probes_200']:,} ({share}) | "
            f"{s['probes_503']:,} | {s['probes_other']:,} | {_ms(s['probe_p50_ms'])} | {_ms(s['probe_p99_ms'])} | "
            f"{_ms(s['probe_max_ms'])} | "
            f"{s['sender_outcomes'].get('200', 0):,} of {senders_total:,} | "
            f"{s['upstream_open_peak_while_trickling']} | {s['upstream_open_peak']} | "
            f"+{s['rss_growth_mib_max']:.1f} MiB |"
        )
    out.append("")
    out.append(
        f"Fast clients: wrk -t1 -c{settings['connections']} -d{settings['duration_s']}s, POST /upload "
        "(Lua script), median over the rounds"
    )
    out.append("")
    out.append("| body | edge | req/s | min-max | p50 ms | p99 ms | edge CPU us/req | errors |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for size, entry in summary["fast_clients"].items():
        for name, w in entry["contenders"].items():
            cpu = f"{w['cpu_us_per_request']:.0f}" if w["cpu_us_per_request"] is not None else "-"
            out.append(
                f"| {int(size) // KIB} KiB | {name} | {w['requests_per_sec']:,.0f} | "
                f"{w['min_requests_per_sec']:,.0f}-{w['max_requests_per_sec']:,.0f} | {w['p50_ms']:.3f} | "
                f"{w['p99_ms']:.3f} | {cpu} | {w['socket_errors'] + w['non_2xx']} |"
            )
        ratio = entry["buffered_over_streaming"]
        out.append(
            f"| {int(size) // KIB} KiB | **buffered / streaming** | {_pct(ratio['requests_per_sec'])} | | "
            f"{_pct(ratio['p50_ms'])} | {_pct(ratio['p99_ms'])} | {_pct(ratio['cpu_us_per_request'])} | |"
        )
    out.append("")
    out.append(
        f"Memory: {settings['memory_clients']} x POST /upload of 60 KiB at 16 KiB/s, the last 4 KiB held back "
        "until all clients have sent the rest"
    )
    out.append("")
    out.append("| edge | clients answered 200 | RSS growth, median | min-max | idle RSS of the fresh edge, median |")
    out.append("|---|---:|---:|---:|---:|")
    for name, mem in summary["memory"].items():
        total = sum(mem["outcomes"].values())
        out.append(
            f"| {name} | {mem['outcomes'].get('200', 0):,} of {total:,} | +{mem['rss_growth_mib_median']:.1f} MiB | "
            f"+{mem['rss_growth_mib_min']:.1f} to +{mem['rss_growth_mib_max']:.1f} MiB | "
            f"{mem['idle_rss_mib_median']:.1f} MiB |"
        )
    out.append("")
    for note in report["notes"]:
        out.append(f"Note: {note}")
    return "\n".join(out)


def build_report(
    args: argparse.Namespace, machine: dict[str, Any], results: Results, notes: list[str], seconds: float
) -> dict[str, Any]:
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "wall_clock_s": seconds,
        "settings": {
            "rounds": args.rounds,
            "senders": args.senders,
            "memory_clients": args.memory_clients,
            "connections": args.connections,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "slow_body_bytes": SLOW_BODY_BYTES,
            "slow_rate_bytes_per_s": SLOW_CHUNK_BYTES / SLOW_INTERVAL_S,
            "probe_body_bytes": PROBE_BODY_BYTES,
            "probe_address": PROBE_ADDRESS,
            "memory_body_bytes": MEMORY_BODY_BYTES,
            "memory_rate_bytes_per_s": MEMORY_CHUNK_BYTES / MEMORY_INTERVAL_S,
            "wrk_bodies": list(WRK_BODIES),
            "edge_env": {
                "EDGE_WORKERS": "1",
                "EDGE_RATE_LIMIT_DEFAULT": "off",
                "EDGE_ACCESS_LOG": "false",
                "EDGE_LOG_LEVEL": "warning",
                **LOAD_GENERATOR_CAPS,
                "EDGE_REQUEST_BUFFER_BYTES": {name: str(n) for name, n in BUFFER_BYTES.items()},
            },
        },
        "machine": machine,
        "idle_rss_mib": results.idle_rss_mib,
        "summary": summarize(results),
        "rounds": {
            "slow_senders": {name: [asdict(r) for r in rounds] for name, rounds in results.slow.items()},
            "memory": {name: [asdict(r) for r in rounds] for name, rounds in results.memory.items()},
            "fast_clients": {
                str(size): {name: [asdict(r) for r in rounds] for name, rounds in by_name.items()}
                for size, by_name in results.wrk.items()
            },
        },
        "notes": notes + results.notes,
    }


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the edge's request buffering (EDGE_REQUEST_BUFFER_BYTES 65536 vs 0): "
        "slow senders against a normal client, fast clients, memory.",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--senders", type=int, default=150, help="slow senders, 16 KiB at 2 KiB/s each (150)")
    parser.add_argument("--memory-clients", type=int, default=200, help="clients sending 60 KiB slowly (200)")
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run (4)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of untimed wrk per edge and body first (1)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (server logs, Lua scripts)")
    args = parser.parse_args(argv)
    if min(args.rounds, args.senders, args.memory_clients, args.duration, args.connections) < 1:
        parser.error("--rounds, --senders, --memory-clients, --duration and --connections must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.senders > 5000 or args.memory_clients > 5000:
        parser.error("--senders and --memory-clients are at most 5000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = shutil.which("wrk")
    if wrk is None:
        print(
            "buffering_bench: wrk is not installed (scripts/install_debian_packages.sh wrk:wrk)",
            file=sys.stderr,
        )
        return 2
    return run_benchmark(
        "buffering_bench",
        lambda tmp, cleanup: run(args, wrk, tmp, cleanup),
        json_path=args.json,
        keep_tmp=args.keep_tmp,
    )


def run(args: argparse.Namespace, wrk: str, tmp: Path, cleanup: contextlib.ExitStack) -> tuple[dict[str, Any], int]:
    begun = time.monotonic()
    os.environ.setdefault("GIT_OPTIONAL_LOCKS", "0")  # the commit lookup must not touch the index
    machine = machine_info(wrk, None)
    machine.pop("nginx", None)
    machine["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    log(f"load average at start: {machine['load_average_at_start']}")
    contenders = build_contenders(tmp)
    upstreams = [contender.upstream for contender in contenders]
    for upstream in upstreams:
        upstream.start()
        cleanup.callback(upstream.stop)
    for contender in contenders:
        cleanup.callback(contender.stop_edge)  # each round's edge, stopped before the upstreams
    for upstream in upstreams:
        upstream.wait_ready()
    log("upstreams: " + ", ".join(f"{s.name} on :{s.port} (pid {s.pid})" for s in upstreams))
    scripts = {size: write_wrk_script(tmp, size) for size in WRK_BODIES}
    results = run_rounds(wrk, contenders, scripts, args)
    notes = [
        f"{upstream.name} exited during the run; see its log"
        for upstream in upstreams
        if upstream.proc is not None and upstream.proc.poll() is not None
    ]
    report = build_report(args, machine, results, notes, time.monotonic() - begun)
    print(format_report(report), flush=True)
    log(f"wall clock {report['wall_clock_s']:.0f} s; load average at end: {machine['load_average_at_end']}")
    return report, 0


if __name__ == "__main__":
    sys.exit(main())
