"""The edge as operators run it: `python -m edge` in a process of its own.

Start-up, JSON logging, the graceful drain on SIGTERM (in-flight requests finish, new
connections are refused, the drain is bounded by EDGE_DRAIN_TIMEOUT), several workers,
and the platform's `PORT`. The upstream is the session's real upstream server.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.processes import children_of, edge_process
from tests.servers import UpstreamApp, closed_port


@dataclass
class BackgroundRequest:
    """One GET, made in a thread so that the test can signal the edge meanwhile."""

    url: str
    timeout: float = 30.0
    status: int | None = None
    body: bytes | None = None
    error: BaseException | None = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with httpx.Client(trust_env=False, timeout=self.timeout) as client:
                response = client.get(self.url)
            self.status = response.status_code
            self.body = response.content
        except BaseException as exc:
            self.error = exc

    @property
    def in_flight(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the request never finished"


def wait_for_upstream_request(upstream: UpstreamApp, path: bytes, seen_before: int) -> None:
    deadline = time.monotonic() + 5
    while sum(1 for p in upstream.record.paths() if p == path) <= seen_before:
        assert time.monotonic() < deadline, f"the upstream never received {path!r}"
        time.sleep(0.01)


def slow_requests_seen(upstream: UpstreamApp) -> int:
    return sum(1 for path in upstream.record.paths() if path == b"/slow")


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.25):
            return True
    except OSError:
        return False


def process_gone(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def json_log_lines(stream: str) -> list[dict[str, object]]:
    entries = []
    for line in stream.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"a log line on stdout is not JSON: {line!r}")
        assert isinstance(entry, dict), f"a log line is JSON but not an object: {line!r}"
        entries.append(entry)
    return entries


# -- graceful shutdown ------------------------------------------------------------------------------


def test_sigterm_drains_in_flight_request_and_refuses_new_connections(
    tmp_path: Path, upstream_url: str, upstream: UpstreamApp
) -> None:
    port = closed_port()
    env = {"EDGE_UPSTREAM_URL": upstream_url, "EDGE_PORT": str(port), "EDGE_DRAIN_TIMEOUT": "10"}
    with edge_process(tmp_path, port, env) as edge:
        seen = slow_requests_seen(upstream)
        started = time.monotonic()
        request = BackgroundRequest(f"{edge.url}/slow?delay=1.5")
        wait_for_upstream_request(upstream, b"/slow", seen)
        time.sleep(max(0.0, 0.3 - (time.monotonic() - started)))
        assert request.in_flight

        signalled = edge.terminate()

        refused_at = None
        while time.monotonic() - signalled < 1.0 and request.in_flight:
            if not accepts_connections(port):
                refused_at = time.monotonic()
                break
            time.sleep(0.02)
        still_in_flight_when_refused = request.in_flight
        assert refused_at is not None, "the edge still accepted new connections 1 s after SIGTERM"
        assert still_in_flight_when_refused, "connections were refused only once the drain had ended"

        request.join(timeout=10)
        assert request.error is None, f"the in-flight request failed during the drain: {request.error!r}"
        assert request.status == 200
        assert request.body == b'{"slow":true}'

        status = edge.process.wait(timeout=10)
        assert status == 0, f"exit status {status}; stderr:\n{edge.stderr()}"
        assert "Traceback" not in edge.stderr()


def test_drain_timeout_bounds_the_shutdown(tmp_path: Path, upstream_url: str, upstream: UpstreamApp) -> None:
    port = closed_port()
    env = {"EDGE_UPSTREAM_URL": upstream_url, "EDGE_PORT": str(port), "EDGE_DRAIN_TIMEOUT": "1"}
    with edge_process(tmp_path, port, env) as edge:
        seen = slow_requests_seen(upstream)
        disconnects_before = len(upstream.record.disconnects)
        request = BackgroundRequest(f"{edge.url}/slow?delay=10")
        wait_for_upstream_request(upstream, b"/slow", seen)
        time.sleep(0.2)

        signalled = edge.terminate()
        try:
            status = edge.process.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            pytest.fail("the edge was still draining 3 s after SIGTERM with EDGE_DRAIN_TIMEOUT=1")
        elapsed = time.monotonic() - signalled
        assert status == 0, f"exit status {status}; stderr:\n{edge.stderr()}"
        # It did wait for the request, about as long as it was told to.
        assert elapsed >= 0.8, f"the edge exited after {elapsed:.2f} s without draining"

        # The long request was cut, not answered.
        request.join(timeout=5)
        assert request.status != 200 or request.body != b'{"slow":true}'
        # ...and the edge's request to the upstream went with it.
        deadline = time.monotonic() + 3
        while not any(path == "/slow" for path, _ in upstream.record.disconnects[disconnects_before:]):
            assert time.monotonic() < deadline, "the upstream request outlived the edge"
            time.sleep(0.02)


# -- logs -------------------------------------------------------------------------------------------------


def test_logs_are_json_lines_on_stdout(tmp_path: Path, upstream_url: str) -> None:
    port = closed_port()
    env = {"EDGE_UPSTREAM_URL": upstream_url, "EDGE_PORT": str(port), "EDGE_DRAIN_TIMEOUT": "2"}
    with edge_process(tmp_path, port, env) as edge:
        with httpx.Client(trust_env=False, timeout=5) as client:
            assert client.get(f"{edge.url}/echo").status_code == 200
        edge.terminate()
        assert edge.process.wait(timeout=10) == 0
        stdout = edge.stdout()

    entries = json_log_lines(stdout)
    assert len(entries) >= 2, f"expected start-up and shutdown log lines, got:\n{stdout}"
    for entry in entries:
        assert {"time", "level", "message"} <= entry.keys(), entry
        assert isinstance(entry["message"], str)
        assert entry["level"] in {"debug", "info", "warning", "error", "critical"}, entry
        assert isinstance(entry["time"], str)
        parsed = datetime.fromisoformat(entry["time"])
        assert parsed.tzinfo is not None, f"log time without a time zone: {entry['time']}"
    messages = " ".join(str(entry["message"]) for entry in entries)
    assert "startup" in messages.lower()
    assert "shutdown" in messages.lower() or "shutting down" in messages.lower()


# -- workers and ports ---------------------------------------------------------------------------------


def test_two_workers_serve_and_stop_on_sigterm(tmp_path: Path, upstream_url: str) -> None:
    port = closed_port()
    env = {
        "EDGE_UPSTREAM_URL": upstream_url,
        "EDGE_PORT": str(port),
        "EDGE_WORKERS": "2",
        "EDGE_DRAIN_TIMEOUT": "2",
    }
    with edge_process(tmp_path, port, env) as edge:
        with httpx.Client(trust_env=False, timeout=5) as client:
            for _ in range(10):
                response = client.get(f"{edge.url}/echo", headers={"connection": "close"})
                assert response.status_code == 200
                assert response.json()["raw_path"] == "/echo"

        workers: list[int] = []
        deadline = time.monotonic() + 5
        while len(workers) < 2 and time.monotonic() < deadline:
            workers = children_of(edge.process.pid)
            time.sleep(0.05)
        assert len(workers) >= 2, f"expected 2 worker processes, found {workers}"

        edge.terminate()
        status = edge.process.wait(timeout=15)
        assert status == 0, f"exit status {status}; stderr:\n{edge.stderr()}"
        for worker in workers:
            deadline = time.monotonic() + 5
            while not process_gone(worker):
                assert time.monotonic() < deadline, f"worker {worker} outlived the edge"
                time.sleep(0.05)


def test_platform_port_is_used_when_edge_port_is_unset(tmp_path: Path, upstream_url: str) -> None:
    port = closed_port()
    env = {"EDGE_UPSTREAM_URL": upstream_url, "PORT": str(port), "EDGE_DRAIN_TIMEOUT": "2"}
    assert "EDGE_PORT" not in os.environ
    with edge_process(tmp_path, port, env) as edge:
        with httpx.Client(trust_env=False, timeout=5) as client:
            assert client.get(f"{edge.url}/echo").status_code == 200
        edge.terminate()
        assert edge.process.wait(timeout=10) == 0
