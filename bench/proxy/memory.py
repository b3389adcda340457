"""The memory test: 1 GiB (`--memory-bytes`) streamed up to `/upload` and down from `/big`
through the plain edge while its RSS is sampled, and the byte counts checked."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

from bench.proxy.contenders import Server
from bench.proxy.procfs import rss_kib
from bench.support import MIB, log


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

    def transfer(self, direction: str) -> Transfer | None:
        return next((transfer for transfer in self.transfers if transfer.direction == direction), None)


def measure_memory(edge: Server, size: int) -> MemoryResult:
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
