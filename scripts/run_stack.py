"""`make run`: the whole stack in the foreground; Ctrl-C (or SIGTERM) stops every process.

Starts, in order: the provider simulator on SIM_PORT (9100) unless both GROQ_API_KEY and
ELEVENLABS_API_KEY are set, the internal app on APP_PORT (8000), and the edge on EDGE_PORT
(8080) in front of it. If one process dies, the others are stopped too and the exit
status says so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

STOP_TIMEOUT_S = 25


def start(name: str, module: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    print(f"run: starting {name} (python -m {module})", flush=True)
    return subprocess.Popen([sys.executable, "-m", module], env=env)


def wait_until_up(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - a fixed loopback URL
                return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    return False


def main() -> int:
    env = dict(os.environ)
    app_port = env.setdefault("APP_PORT", "8000")
    env.setdefault("EDGE_UPSTREAM_URL", f"http://127.0.0.1:{app_port}")
    env.setdefault("EDGE_POLICY_FILE", str(Path(__file__).resolve().parent.parent / "config" / "edge-policy.toml"))
    edge_port = env.get("EDGE_PORT") or env.get("PORT") or "8080"
    simulated = not (env.get("GROQ_API_KEY") and env.get("ELEVENLABS_API_KEY"))
    if simulated:
        sim_port = env.setdefault("SIM_PORT", "9100")
        env["GROQ_BASE_URL"] = f"http://127.0.0.1:{sim_port}/openai/v1"
        env["ELEVENLABS_BASE_URL"] = f"http://127.0.0.1:{sim_port}"
        env.setdefault("GROQ_API_KEY", "simulated")
        env.setdefault("ELEVENLABS_API_KEY", "simulated")

    processes: list[subprocess.Popen[bytes]] = []
    stopping = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    try:
        if simulated:
            sim = start("provider simulator (no API keys set)", "sim", env)
            processes.append(sim)
            if not wait_until_up(f"http://127.0.0.1:{sim_port}/_sim/health", sim):
                print("run: the simulator did not come up", file=sys.stderr)
                return 1
        app = start("app", "app", env)
        processes.append(app)
        if not wait_until_up(f"http://127.0.0.1:{app_port}/api/v1/ready", app):
            print("run: the app did not come up", file=sys.stderr)
            return 1
        edge = start("edge", "edge", env)
        processes.append(edge)
        if wait_until_up(f"http://127.0.0.1:{edge_port}/_edge/ready", edge):
            print(f"run: ready at http://127.0.0.1:{edge_port}/ (Ctrl-C stops everything)", flush=True)
        while not stopping and all(process.poll() is None for process in processes):
            time.sleep(0.2)
        failed = [process for process in processes if process.poll() not in (None, 0)]
        return 1 if failed and not stopping else 0
    finally:
        # Edge first, so no request reaches an app that is already going away.
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(processes):
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
        print("run: stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
