"""What every benchmark script needs: servers run as subprocesses, free ports, a clean
environment, progress lines, percentiles, and the end of `main` they all share
(`run_benchmark`: signals, temp dir, clean-up, JSON, exit status)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
MIB = 1024 * 1024
GIB = 1024 * MIB


class BenchError(Exception):
    """The benchmark itself cannot run (a tool is missing, a server does not start, a turn fails)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(prefixes: tuple[str, ...], extra: dict[str, str]) -> dict[str, str]:
    """This environment without the caller's settings under `prefixes` (and `ENVIRONMENT`,
    `PORT`), plus `extra`: a benchmark measures its own configuration, not the shell's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes) and k not in ("ENVIRONMENT", "PORT")}
    env.update(extra)
    return env


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


# A benchmark's body: `(tmp, cleanup) -> (report for --json or None, exit status)`.
Measure = Callable[[Path, contextlib.ExitStack], tuple[dict[str, Any] | None, int]]


def run_benchmark(
    name: str,
    measure: Measure,
    *,
    json_path: Path | None = None,
    keep_tmp: bool = False,
    errors: tuple[type[Exception], ...] = (),
) -> int:
    """Runs `measure(tmp, cleanup)` in a fresh temp dir and returns the exit status for `main`.

    `measure` prints its report and returns it with its exit status; the report is then
    written to `json_path` when given. Whatever `measure` starts it registers on `cleanup`
    (servers to stop, keys to delete), which is unwound last in, first out, however the run
    ends, with SIGINT ignored so that a second Ctrl-C cannot skip it. SIGTERM and SIGINT
    (even where the shell started the benchmark with SIGINT ignored) interrupt the run: 130.
    `BenchError`, `OSError`, a subprocess timeout or one of `errors` mean the benchmark itself
    could not run: 2, and the temp dir (the servers' logs) is kept, as with `keep_tmp`.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    could_not_run: tuple[type[Exception], ...] = (BenchError, OSError, subprocess.TimeoutExpired, *errors)
    tmp = Path(tempfile.mkdtemp(prefix=f"{name.replace('_', '-')}-"))
    cleanup = contextlib.ExitStack()
    try:
        report, status = measure(tmp, cleanup)
        if json_path is not None and report is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report, indent=2) + "\n")
            log(f"results written to {json_path}")
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; stopping the servers", file=sys.stderr)
        return 130
    except could_not_run as exc:
        keep_tmp = True
        print(f"{name}: the benchmark could not run: {exc}", file=sys.stderr)
        print(f"{name}: server logs kept in {tmp}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cleanup.close()
        if not keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return status


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def machine() -> dict[str, Any]:
    """What a reader needs to compare a run's numbers with their own."""
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


@dataclass
class Service:
    """A server run as a subprocess in a session of its own (Ctrl-C reaches only the bench).

    Ready when `GET ready_path` answers 200 (with `ready_body`, when given)."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str] | None = None
    ready_path: str = "/"
    ready_body: bytes | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError(f"{self.name} is not running")
        return self.proc.pid

    def start(self) -> None:
        with self.log_path.open("wb") as log_file:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last_error = "no answer"
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise BenchError(f"{self.name} exited (status {code}):\n{self.log_tail()}")
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                connection.request("GET", self.ready_path)
                response = connection.getresponse()
                body = response.read()
                if response.status == 200 and self.ready_body in (None, body):
                    return
                last_error = f"status {response.status}, body {body[:80]!r}"
            except OSError as exc:
                last_error = repr(exc)
            finally:
                connection.close()
            time.sleep(0.05)
        raise BenchError(f"{self.name} not ready after {timeout:.0f} s ({last_error}):\n{self.log_tail()}")

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=5)
        # Whatever it left in its own process group (nginx's worker, say).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.proc = None


def started_simulator(tmp: Path, cleanup: contextlib.ExitStack) -> Service:
    """`python -m sim` on a free loopback port (silent MP3s: no encoder's time in a
    measurement), ready, and stopped when `cleanup` closes."""
    port = free_port()
    sim = Service(
        "sim",
        [sys.executable, "-m", "sim"],
        port,
        tmp / "sim.log",
        clean_env(("SIM_",), {"SIM_HOST": "127.0.0.1", "SIM_PORT": str(port), "SIM_MP3_ENCODER": "silent"}),
        "/_sim/health",
    )
    cleanup.callback(sim.stop)
    sim.start()
    sim.wait_ready()
    return sim
