"""Instructions per request: what the edge costs, counted rather than timed.

On a shared VM, req/s and CPU time drift by tens of percent between minutes (see
docs/benchmarks.md); `valgrind --tool=callgrind` counts the instructions a process executes,
which is the same for the same code and input whatever else the machine is doing. The
edge (`python -m edge`, one worker) runs under callgrind in front of
`bench/tiny_upstream.py`, configured as one of the proxy benchmark's edges (`--config`:
`plain`, rate limiting and access log off; `plain-metrics`, the same with EDGE_METRICS_PORT;
`memory` or `redis`, every concern on, rate limits in memory or in Redis), and one client
sends N sequential keep-alive requests; the count is taken at two N, so start-up and
shut-down cancel out:

    instructions per request = (I(N2) - I(N1)) / (N2 - N1)

With `--base REV` the same is measured for another revision, checked out into a temporary
git worktree, so a change's cost is read as a ratio of two counts.

Run: `python bench/instructions_bench.py --base 34e3ba4 --config plain` (about 3 minutes
per configuration: callgrind runs Python some 50 times slower).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.proxy.contenders import DEFAULT_REDIS_URL, GENEROUS_RATE_LIMIT, LOAD_GENERATOR_CAPS, ORIGIN
from bench.support import ROOT, BenchError, Service, clean_env, free_port, log, run_benchmark

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://app.example.com\r\n\r\n"
TOTALS = re.compile(rb"^totals:\s+(\d+)", re.MULTILINE)
READY_TIMEOUT_S = 180.0  # the edge starts in seconds; under callgrind in a minute or more

# The proxy benchmark's edges (bench/proxy/contenders.py), by name.
CONFIGS: dict[str, dict[str, str]] = {
    "plain": {"EDGE_RATE_LIMIT_DEFAULT": "off", "EDGE_ACCESS_LOG": "false", "EDGE_LOG_LEVEL": "warning"},
    "memory": {
        "EDGE_RATE_LIMIT_DEFAULT": GENEROUS_RATE_LIMIT,
        "EDGE_CORS_ALLOW_ORIGINS": ORIGIN,
        "EDGE_ACCESS_LOG": "true",
        "EDGE_LOG_LEVEL": "info",
    },
}
# The plain edge with its metrics on (bench/metrics_bench.py's other edge): a port of its own.
CONFIGS["plain-metrics"] = {**CONFIGS["plain"], "EDGE_METRICS_PORT": str(free_port())}
CONFIGS["redis"] = {
    **CONFIGS["memory"],
    "EDGE_RATE_LIMIT_STORAGE_URL": DEFAULT_REDIS_URL,
    # Its own prefix: the window's keys expire a second after the last hit.
    "EDGE_RATE_LIMIT_KEY_PREFIX": "edge-instructions-bench",
}


def send_requests(port: int, count: int) -> None:
    """`count` requests one after another on one keep-alive connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        for _ in range(count):
            sock.sendall(REQUEST)
            received = b""
            while not received.endswith(b"\r\n\r\nok"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise BenchError("the edge closed the connection")
                received += chunk


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"the edge exited with status {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.5)
    raise BenchError(f"the edge did not listen within {timeout:.0f} s")


def instructions(tree: Path, upstream_url: str, config: str, count: int, tmp: Path) -> int:
    """What the edge of `tree` executes in all, start to exit, serving `count` requests."""
    port = free_port()
    out = tmp / f"callgrind-{port}.out"
    env = clean_env(
        ("EDGE_",),
        {
            "EDGE_UPSTREAM_URL": upstream_url,
            "EDGE_HOST": "127.0.0.1",
            "EDGE_PORT": str(port),
            **CONFIGS[config],
            **LOAD_GENERATOR_CAPS,
        },
    )
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m", "edge"]
    with (tmp / f"edge-{port}.log").open("wb") as log_file:
        process = subprocess.Popen(argv, cwd=tree, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process, READY_TIMEOUT_S)
        send_requests(port, count)
    finally:
        process.terminate()
        process.wait(timeout=120)
    found = TOTALS.search(out.read_bytes())
    if found is None:
        raise BenchError(f"no totals in {out}")
    return int(found.group(1))


@contextlib.contextmanager
def checkout(rev: str, tmp: Path) -> Iterator[Path]:
    tree = tmp / f"tree-{rev}"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), rev], cwd=ROOT, check=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)


def per_request(tree: Path, upstream_url: str, config: str, counts: tuple[int, int], tmp: Path) -> float:
    low, high = (instructions(tree, upstream_url, config, count, tmp) for count in counts)
    return (high - low) / (counts[1] - counts[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--base", help="a revision to compare the working tree with")
    parser.add_argument("--requests", type=int, nargs=2, default=(200, 1200), metavar=("N1", "N2"))
    parser.add_argument("--config", choices=sorted(CONFIGS), default="plain", help="which edge (plain)")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print(
            "instructions_bench: valgrind is not installed (scripts/install_debian_packages.sh valgrind:valgrind)",
            file=sys.stderr,
        )
        return 2
    return run_benchmark(
        "instructions_bench",
        lambda tmp, cleanup: run(args, tmp, cleanup),
        errors=(subprocess.CalledProcessError,),  # the base revision's worktree
    )


def run(args: argparse.Namespace, tmp: Path, cleanup: contextlib.ExitStack) -> tuple[None, int]:
    counts = (args.requests[0], args.requests[1])
    port = free_port()
    upstream = Service(
        "upstream", [sys.executable, "bench/tiny_upstream.py", "--port", str(port)], port, tmp / "upstream.log"
    )
    upstream.start()
    cleanup.callback(upstream.stop)
    upstream.wait_ready()
    results = {"working tree": per_request(ROOT, upstream.url, args.config, counts, tmp)}
    log(f"working tree: {results['working tree']:,.0f} instructions per request")
    if args.base:
        with checkout(args.base, tmp) as tree:
            results[args.base] = per_request(tree, upstream.url, args.config, counts, tmp)
        log(f"{args.base}: {results[args.base]:,.0f} instructions per request")
    print(f"\n{args.config} edge, {counts[1] - counts[0]} sequential requests (N = {counts[0]}, {counts[1]})\n")
    print("| edge | instructions per request |")
    print("|---|---:|")
    for name, value in results.items():
        print(f"| {name} | {value:,.0f} |")
    if args.base:
        print(f"\nworking tree / {args.base}: {results['working tree'] / results[args.base]:.1%}")
    return None, 0


if __name__ == "__main__":
    sys.exit(main())
