"""What reading a hostile upload costs: the 20 MiB inputs of `tests.audio_support.hostile_inputs`,
built to make a reader walk, scan or sum as much as it can, each read

- as the app reads an upload: `inspect_upload` under a byte limit it fits in;
- as the simulator reads one: `duration_seconds(..., measure=True)` as its sniffed format
  (WebM's media walked where the headers declare no duration);

and timed against a linear scan of the same bytes (`zlib.crc32`, one pass over every byte
in C), in `--rounds` rounds, each read and its scan on this thread's CPU time: on a shared
machine the ratio of the two holds where seconds do not. Target: every read costs at most
`RATIO_TARGET` scans (the least times over the rounds). Every walk of `common.audio` is bounded, so a
read costs a few dozen scans of 20 MiB at most, and fewer of a larger input; a walk to the
end of mp4-tiny-boxes (26 times the boxes of the bound) would cost about 500.

Prints one line per input and PASS/FAIL. Exit status 1 when a target is missed, 2 when the
benchmark could not run. Run: `.venv/bin/python bench/audio_bench.py [--rounds 5 --json PATH]`
(about 15 s). Results are in docs/benchmarks.md#hostile-audio-uploads.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.audio import AudioRejected, inspect_upload
from bench.support import MIB, machine, run_benchmark
from common.audio import duration_seconds, sniff
from tests.audio_support import hostile_inputs

RATIO_TARGET = 50.0


def app_read(data: bytes) -> None:
    with contextlib.suppress(AudioRejected):
        inspect_upload(data, max_bytes=len(data), max_seconds=math.inf)


def simulator_read(data: bytes) -> None:
    fmt = sniff(data)
    if fmt is not None:  # else the simulator refuses it on its extension and reads no more
        duration_seconds(data, fmt, measure=True)


def scan(data: bytes) -> None:
    zlib.crc32(data)


def timed(read: Callable[[bytes], None], data: bytes) -> tuple[float, float]:
    """(CPU seconds of this thread, wall seconds) of one read."""
    started_cpu, started = time.thread_time(), time.perf_counter()
    read(data)
    return time.thread_time() - started_cpu, time.perf_counter() - started


def measure_input(data: bytes, rounds: int) -> dict[str, Any]:
    """Each read's least CPU time over the rounds in scans (their least too), and its median
    wall time. Interference only ever adds time to a fixed piece of work, so the least time
    is the work's own; the scans are interleaved with the reads, to share their conditions."""
    reads = {"app": app_read, "simulator": simulator_read}
    cpu: dict[str, list[float]] = {name: [] for name in reads}
    walls: dict[str, list[float]] = {name: [] for name in reads}
    scans: list[float] = []
    for _ in range(rounds):
        for name, read in reads.items():
            gc.collect()  # a collection falls in neither the read nor its scan
            scans.append(timed(scan, data)[0])
            read_cpu, read_wall = timed(read, data)
            cpu[name].append(read_cpu)
            walls[name].append(read_wall)
    return {
        "bytes": len(data),
        "scan_cpu_s": min(scans),
        **{f"{name}_scans": min(values) / min(scans) for name, values in cpu.items()},
        **{f"{name}_wall_s": statistics.median(values) for name, values in walls.items()},
    }


def run(rounds: int) -> tuple[dict[str, Any], int]:
    print(f"each read's least CPU time in scans of the same bytes (zlib.crc32) over {rounds} rounds, median wall time:")
    print(f"{'input':<26} {'MiB':>5} {'scan':>8} {'app':>18} {'simulator':>18}")
    results: dict[str, dict[str, Any]] = {}
    for name, data in hostile_inputs():
        result = results[name] = measure_input(data, rounds)
        cells = [
            f"{result[f'{read}_scans']:6.1f} ({result[f'{read}_wall_s'] * 1e3:5.0f} ms)"
            for read in ("app", "simulator")
        ]
        print(f"{name:<26} {len(data) / MIB:5.1f} {result['scan_cpu_s'] * 1e3:5.1f} ms {cells[0]:>18} {cells[1]:>18}")
    worst = max(result[f"{read}_scans"] for result in results.values() for read in ("app", "simulator"))
    passed = worst <= RATIO_TARGET
    print(f"costliest read: {worst:.1f} scans  {'PASS' if passed else 'FAIL'} (<= {RATIO_TARGET:g} scans)")
    report = {"machine": machine(), "rounds": rounds, "ratio_target": RATIO_TARGET, "inputs": results}
    return report, 0 if passed else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    return run_benchmark("audio_bench", lambda tmp, cleanup: run(args.rounds), json_path=args.json)


if __name__ == "__main__":
    sys.exit(main())
