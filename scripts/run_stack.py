"""`make run`: the whole stack in the foreground, started and stopped like a supervisor.

Every process's configuration is checked first, by the same function its own entry point
uses, so a mistake shows that process's own message and nothing starts. Then, in order:
the provider simulator (unless both GROQ_API_KEY and ELEVENLABS_API_KEY are set), the
internal app, and the edge in front of it, each waited for until it is ready. Each child
runs in a process group of its own, so Ctrl-C or SIGTERM reaches only this launcher, which
stops them in the reverse order, one after the other: the edge drains, the app finishes
the turns in flight (their speech and memories need the simulator, still up), then the
simulator. A second Ctrl-C kills what is left. If a child dies, the rest are stopped too
and the exit status is 1; a configuration error exits 2. See README.md, "Run it".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.__main__ import load_configuration as app_configuration  # noqa: E402
from common.settings import ConfigurationError  # noqa: E402
from edge.__main__ import load_configuration as edge_configuration  # noqa: E402
from sim.__main__ import GRACEFUL_SHUTDOWN_SECONDS as SIM_DRAIN_S  # noqa: E402
from sim.__main__ import load_configuration as sim_configuration  # noqa: E402

ConfigurationT = TypeVar("ConfigurationT")

START_TIMEOUT_S = 60.0
# What a child is given beyond its own drain time before it is killed.
STOP_MARGIN_S = 5.0
WILDCARDS = ("0.0.0.0", "::", "")  # noqa: S104 - names, not a bind


@dataclass
class Child:
    """One process of the stack: how to tell it is ready, and how long its drain may take."""

    name: str
    module: str
    url: str
    ready_path: str
    drain_s: float  # its own graceful-shutdown limit
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        print(f"run: starting the {self.name} (python -m {self.module})", flush=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            process_group=0,  # the terminal's Ctrl-C goes to the launcher alone
        )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_until_ready(self, stop_requested: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and self.running() and not stop_requested():
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=1):  # noqa: S310 - our loopback URL
                    return True
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        return False

    def stop(self, patience_s: float) -> None:
        """SIGTERM, then up to its drain time (and a margin) to exit; killed after that."""
        if self.process is None:
            return
        if self.process.poll() is None:
            print(f"run: stopping the {self.name}", flush=True)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=patience_s)
            except subprocess.TimeoutExpired:
                print(f"run: the {self.name} did not stop within {patience_s:.0f} s: killing it", flush=True)
                self.kill()
        status = self.process.wait()
        if status not in (0, -signal.SIGTERM):
            print(f"run: the {self.name} exited with status {status}", flush=True)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def loopback(host: str) -> str:
    """Where this machine reaches a server bound to `host`."""
    return "127.0.0.1" if host in WILDCARDS else host


def stack_environment() -> bool:
    """Fills in the stack's wiring where this environment (which the children inherit)
    leaves it unset; whether the simulator stands in for the providers."""
    os.environ.setdefault("EDGE_POLICY_FILE", str(ROOT / "config" / "edge-policy.toml"))
    simulated = not (os.environ.get("GROQ_API_KEY") and os.environ.get("ELEVENLABS_API_KEY"))
    if simulated:
        os.environ.setdefault("GROQ_API_KEY", "simulated")
        os.environ.setdefault("ELEVENLABS_API_KEY", "simulated")
    return simulated


def checked(name: str, configuration: Callable[[], ConfigurationT], errors: list[str]) -> ConfigurationT | None:
    """A process's validated configuration, or None with its own message in `errors`."""
    try:
        return configuration()
    except ConfigurationError as error:
        errors.append(f"{name}: {error}")
        return None


def plan(simulated: bool) -> tuple[list[Child], list[str]]:
    """The children to start, in order, from their own validated configurations; or the
    configuration errors, each in its process's own words. Every process is checked, so
    one run shows every mistake."""
    errors: list[str] = []
    children: list[Child] = []
    if simulated:
        sim = checked("sim", sim_configuration, errors)
        sim_url = f"http://{loopback(sim.host)}:{sim.port}" if sim else "http://127.0.0.1:9100"
        # The simulator serves both providers' APIs; each provider keeps its own breaker
        # and policy on the shared address (docs/resilience.md).
        os.environ["GROQ_BASE_URL"] = f"{sim_url}/openai/v1"
        os.environ["ELEVENLABS_BASE_URL"] = sim_url
        if sim:
            children.append(Child("simulator", "sim", sim_url, "/_sim/health", SIM_DRAIN_S))
    app = checked("app", app_configuration, errors)
    if app:
        app_settings = app[0]
        app_url = f"http://{loopback(app_settings.host)}:{app_settings.port}"
        os.environ.setdefault("EDGE_UPSTREAM_URL", app_url)
        children.append(Child("app", "app", app_url, "/api/v1/ready", app_settings.drain_timeout))
    edge = checked("edge", edge_configuration, errors)
    if edge:
        edge_settings = edge[0]
        edge_url = f"http://{loopback(edge_settings.host)}:{edge_settings.port}"
        children.append(Child("edge", "edge", edge_url, "/_edge/ready", edge_settings.drain_timeout))
    return children, errors


def main() -> int:
    children, errors = plan(stack_environment())
    if errors:
        for error in errors:
            print(error, file=sys.stderr)
        print("run: nothing started; fix the configuration above", file=sys.stderr)
        return 2

    signals = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            print(f"run: {signal.Signals(signum).name}: stopping (again to kill at once)", flush=True)
        else:
            for child in children:
                child.kill()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    status = 0
    try:
        for child in children:
            child.start()
            if not child.wait_until_ready(lambda: signals > 0):
                if signals:
                    return 0
                if child.running():
                    print(f"run: the {child.name} was not ready within {START_TIMEOUT_S:.0f} s", file=sys.stderr)
                else:
                    print(f"run: the {child.name} exited during start-up", file=sys.stderr)
                return 1
        *internal, edge = children
        behind = ", ".join(f"the {child.name} at {child.url}" for child in reversed(internal))
        print(f"run: ready at {edge.url}/ ({behind}); Ctrl-C stops the stack", flush=True)
        while signals == 0:
            gone = [child for child in children if not child.running()]
            if gone:
                print(f"run: the {gone[0].name} exited unexpectedly: stopping the stack", file=sys.stderr)
                status = 1
                break
            time.sleep(0.2)
        return status
    finally:
        # Edge first, then one after the other: each still has what it calls while it drains.
        for child in reversed(children):
            child.stop(child.drain_s + STOP_MARGIN_S)
        print("run: stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
