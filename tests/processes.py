"""`python -m edge`, `python -m app` or `python -m sim` in a process of its own, for the
tests that need the real entry point: signals, worker processes, restarts, exit statuses,
what reaches standard output."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx

PROJECT_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0


@dataclass
class ServiceProcess:
    module: str
    process: subprocess.Popen[bytes]
    port: int
    stdout_path: Path
    stderr_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def output(self) -> str:
        return f"stdout:\n{self.stdout()}\nstderr:\n{self.stderr()}"

    def wait_until(self, path: str = "/_edge/live", timeout: float = START_TIMEOUT) -> httpx.Response:
        """Polls `path` until it answers 200; fails with the process's output if it does not."""
        deadline = time.monotonic() + timeout
        last: httpx.Response | None = None
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"{self.module} exited with {self.process.returncode}:\n{self.output()}")
                try:
                    last = client.get(self.url + path)
                    if last.status_code == 200:
                        return last
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        shown = last.text if last is not None else "no answer"
        raise AssertionError(f"{path} not 200 within {timeout} s ({shown}):\n{self.output()}")

    def terminate(self) -> float:
        """Sends SIGTERM; returns when it was sent."""
        self.process.send_signal(signal.SIGTERM)
        return time.monotonic()

    def wait(self, timeout: float) -> int:
        """The exit status; killed, and the test failed, if it outlives `timeout`."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.module} still ran after {timeout} s:\n{self.output()}") from None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then the exit status."""
        if self.process.poll() is None:
            self.terminate()
        return self.wait(timeout)

    def kill(self) -> None:
        """Leaves nothing behind: the process and any worker processes it started."""
        workers = children_of(self.process.pid)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        for worker in workers:
            with suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)


def start_process(module: str, log_dir: Path, port: int, env: Mapping[str, str]) -> ServiceProcess:
    """Starts `python -m <module>` with `env` over the (cleaned) test environment; `env` says
    the port it listens on, `port` is where to reach it."""
    log_dir.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "EDGE_HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1", **env}
    stdout_path = log_dir / f"{module}-{port}.stdout"
    stderr_path = log_dir / f"{module}-{port}.stderr"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", module], cwd=PROJECT_ROOT, env=full_env, stdout=out, stderr=err
        )
    return ServiceProcess(module, process, port, stdout_path, stderr_path)


def start_edge_process(log_dir: Path, port: int, env: Mapping[str, str]) -> ServiceProcess:
    return start_process("edge", log_dir, port, env)


@contextmanager
def running_process(
    module: str, log_dir: Path, port: int, env: Mapping[str, str], ready_path: str
) -> Iterator[ServiceProcess]:
    """A started process, answering `ready_path` when entered, gone (with its children) when left."""
    running = start_process(module, log_dir, port, env)
    try:
        running.wait_until(ready_path)
        yield running
    finally:
        running.kill()


def edge_process(log_dir: Path, port: int, env: Mapping[str, str]) -> contextlib.AbstractContextManager[ServiceProcess]:
    return running_process("edge", log_dir, port, env, "/_edge/live")


def children_of(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (Linux /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces: the fields after it start after ')'.
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if int(parent) == pid and state != "Z":
            children.append(int(entry.name))
    return children
