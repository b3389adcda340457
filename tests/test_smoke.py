"""scripts/smoke.py against the stack `make run` starts (scripts/run_stack.py): it passes
when every step works, and says which step failed, and why, when one does not. The
compose stack's run is in tests/test_containers.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.app_support import new_port
from tests.processes import PROJECT_ROOT
from tests.test_run_stack import Stack, started_stack

SMOKE = PROJECT_ROOT / "scripts" / "smoke.py"
STEPS = [
    "edge ready",
    "app ready",
    "session",
    "text turn",
    "voice turn",
    "reply audio",
    "delete session",
    "session gone",
]
STEP_LINE = re.compile(r"smoke: (?P<step>[a-z ]+) ok \(\d+ ms\)")
# Session and audio ids: 32 characters of URL-safe base64 or hex.
CAPABILITY_ID = re.compile(r"[A-Za-z0-9_-]{32}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with started_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running


def smoke(url: str, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SMOKE), *options, url], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120
    )


def passed_steps(lines: list[str]) -> list[str | None]:
    """Each line's step, None for a line that is not a passed step's."""
    return [match.group("step") if (match := STEP_LINE.fullmatch(line)) else None for line in lines]


def test_every_step_passes_against_a_working_stack(stack: Stack) -> None:
    httpx.post(f"{stack.sim_url}/_sim/reset", timeout=5).raise_for_status()
    completed = smoke(stack.edge_url)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    assert passed_steps(lines) == STEPS, lines
    assert not CAPABILITY_ID.search(completed.stdout)
    # The voice turn really went through the transcriber, and its reply was spoken.
    calls = httpx.get(f"{stack.sim_url}/_sim/calls", timeout=5).json()
    assert calls["transcribe"]["received"] == 1, calls
    assert calls["speech"]["received"] == 2, calls


def test_a_failing_step_is_named_with_its_reason_and_nothing_after_it_runs(stack: Stack) -> None:
    httpx.post(f"{stack.sim_url}/_sim/reset", timeout=5).raise_for_status()
    # Speech refused for good: the text turn's reply comes without audio.
    fault = {"route": "speech", "status": 400, "times": -1}
    httpx.post(f"{stack.sim_url}/_sim/faults", json=fault, timeout=5).raise_for_status()
    try:
        completed = smoke(stack.edge_url)
    finally:
        httpx.delete(f"{stack.sim_url}/_sim/faults", timeout=5).raise_for_status()
    assert completed.returncode == 1, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    assert passed_steps(lines[:-1]) == STEPS[:3], lines
    assert lines[-1] == "FAIL: text turn: degraded: speech", lines
    assert not CAPABILITY_ID.search(completed.stdout)


def test_an_unreachable_deployment_fails_the_first_step() -> None:
    completed = smoke(f"http://127.0.0.1:{new_port()}")
    assert completed.returncode == 1
    assert completed.stdout.startswith("FAIL: edge ready: ConnectError"), completed.stdout


def test_a_base_url_that_is_not_http_is_refused() -> None:
    completed = smoke("127.0.0.1:8080")
    assert completed.returncode == 2
    assert "usage: smoke.py [--recording FILE.wav] BASE_URL" in completed.stderr


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (make test installs it)")
def test_a_recording_of_real_speech_can_be_given(stack: Stack, tmp_path: Path) -> None:
    """What the deploy workflow does, so a real transcriber hears words."""
    recording = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(recording), "Hello, this is a smoke test."], check=True, timeout=30)
    httpx.post(f"{stack.sim_url}/_sim/reset", timeout=5).raise_for_status()
    completed = smoke(stack.edge_url, "--recording", str(recording))
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert passed_steps(completed.stdout.splitlines()) == STEPS
    # The simulator saw that file, not the script's own buzz.
    transcriptions = [line for line in stack.output().splitlines() if "audio/transcriptions" in line]
    assert transcriptions, stack.output()[-2000:]


def test_a_recording_that_cannot_be_read_is_a_usage_error(tmp_path: Path) -> None:
    completed = smoke("http://127.0.0.1:9", "--recording", str(tmp_path / "missing.wav"))
    assert completed.returncode == 2
    assert completed.stderr == "smoke.py: cannot read the recording: No such file or directory\n"
