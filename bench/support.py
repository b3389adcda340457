"""What every benchmark script needs: servers run as subprocesses, free ports, a clean
environment, progress lines and percentiles."""

from __future__ import annotations

import contextlib
import http.client
import os
import platform
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


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


def interrupt_on_signals() -> None:
    """A `kill` of the benchmark cleans up like Ctrl-C; Ctrl-C too when started where SIGINT is ignored."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)


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
