"""`make run`'s launcher (scripts/run_stack.py) as a person meets it: started from a shell,
stopped with Ctrl-C, misconfigured. Ctrl-C is SIGINT to the terminal's whole foreground
process group, which is what these tests send."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.app_support import new_port
from tests.processes import PROJECT_ROOT, children_of

LAUNCHER = PROJECT_ROOT / "scripts" / "run_stack.py"
READY_TIMEOUT_S = 90.0


@dataclass
class Stack:
    process: subprocess.Popen[str]
    output_path: Path
    edge_url: str
    app_url: str
    sim_url: str
    children: list[int] = field(default_factory=list)

    def output(self) -> str:
        return self.output_path.read_text()

    def ctrl_c(self) -> None:
        """What a terminal does: SIGINT to every process of its foreground group."""
        os.killpg(self.process.pid, signal.SIGINT)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise AssertionError(f"the launcher still ran after {timeout} s:\n{self.output()}") from None


def launcher_environment(tmp_path: Path, **overrides: str) -> dict[str, str]:
    return {
        **os.environ,  # already cleaned of the project's variables (tests/conftest.py)
        "EDGE_PORT": str(new_port()),
        "APP_PORT": str(new_port()),
        "SIM_PORT": str(new_port()),
        "APP_DATA_DIR": str(tmp_path / "data"),
        "PYTHONUNBUFFERED": "1",
        **overrides,
    }


def run_launcher(env: dict[str, str], output_path: Path) -> subprocess.Popen[str]:
    with output_path.open("w") as output:
        # A group of its own, as a shell gives a foreground job.
        return subprocess.Popen(
            [sys.executable, str(LAUNCHER)],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
            process_group=0,
        )


@contextmanager
def started_stack(tmp_path: Path, **overrides: str) -> Iterator[Stack]:
    env = launcher_environment(tmp_path, **overrides)
    output_path = tmp_path / "launcher.log"
    stack = Stack(
        run_launcher(env, output_path),
        output_path,
        f"http://127.0.0.1:{env['EDGE_PORT']}",
        f"http://127.0.0.1:{env['APP_PORT']}",
        f"http://127.0.0.1:{env['SIM_PORT']}",
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "run: ready at" not in stack.output():
            assert stack.process.poll() is None, stack.output()
            assert time.monotonic() < deadline, stack.output()
            time.sleep(0.1)
        stack.children = children_of(stack.process.pid)
        yield stack
    finally:
        if stack.process.poll() is None:
            os.killpg(stack.process.pid, signal.SIGKILL)
            stack.process.wait()
        for pid in stack.children:  # each leads a process group of its own
            with suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def launcher_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("run: ")]


def test_ctrl_c_during_a_turn_lets_it_finish_with_its_speech_and_memory(tmp_path: Path) -> None:
    with started_stack(tmp_path) as stack:
        ready = next(line for line in launcher_lines(stack.output()) if line.startswith("run: ready at"))
        assert ready.startswith(f"run: ready at {stack.edge_url}/ (the app at {stack.app_url}, the simulator at")
        with httpx.Client(base_url=stack.edge_url, trust_env=False, timeout=60) as client:
            session = client.post("/api/v1/sessions").json()["session_id"]
            # The speech takes 3 s, so Ctrl-C comes while the turn waits for it.
            client.put(f"{stack.sim_url}/_sim/latency", json={"speech": 3000}).raise_for_status()
            result: dict[str, httpx.Response] = {}

            def take_turn() -> None:
                with httpx.Client(base_url=stack.edge_url, trust_env=False, timeout=60) as own:
                    result["turn"] = own.post(f"/api/v1/sessions/{session}/turns", json={"text": "My dog is Max."})

            turn = threading.Thread(target=take_turn)
            turn.start()
            deadline = time.monotonic() + 30
            while client.get(f"{stack.sim_url}/_sim/calls").json()["speech"]["received"] == 0:
                assert time.monotonic() < deadline, stack.output()
                time.sleep(0.05)
            stack.ctrl_c()
            turn.join(timeout=60)
        assert stack.wait() == 0, stack.output()

    output = stack.output()
    response = result["turn"]
    assert response.status_code == 200, output
    document = response.json()
    assert document["audio_url"] is not None, document
    assert document["degraded"] == [], document  # the memory written too
    lines = launcher_lines(output)
    stops = [line for line in lines if line.startswith("run: stopping the")]
    assert stops == ["run: stopping the edge", "run: stopping the app", "run: stopping the simulator"], lines
    assert lines[-1] == "run: stopped"
    assert "Traceback" not in output, output
    assert len(stack.children) == 3
    assert not [pid for pid in stack.children if alive(pid)]


def test_a_child_that_dies_stops_the_stack_with_a_failure(tmp_path: Path) -> None:
    with started_stack(tmp_path) as stack:
        with httpx.Client(trust_env=False) as client:
            assert client.get(f"{stack.app_url}/api/v1/health").status_code == 200
        app_pid = next(pid for pid in stack.children if command_line(pid).endswith(" -m app "))
        os.kill(app_pid, signal.SIGKILL)
        assert stack.wait() == 1, stack.output()
    output = stack.output()
    assert "run: the app exited unexpectedly: stopping the stack" in output, output
    lines = launcher_lines(output)
    assert "run: stopping the edge" in lines, lines
    assert "run: stopping the simulator" in lines, lines


def test_configuration_errors_of_every_process_are_shown_in_their_own_words_before_anything_starts(
    tmp_path: Path,
) -> None:
    env = launcher_environment(tmp_path, EDGE_PORT="notaport", APP_MAX_AUDIO_BYTES="-1", SIM_PORT="99999")
    completed = subprocess.run(
        [sys.executable, str(LAUNCHER)], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 2, completed
    assert completed.stdout == "", completed.stdout  # nothing started
    errors = completed.stderr
    assert "Traceback" not in errors, errors
    for process, variable in (("sim", "SIM_PORT"), ("app", "APP_MAX_AUDIO_BYTES"), ("edge", "EDGE_PORT")):
        assert f"{process}: invalid configuration:\n  {variable}:" in errors, errors
    assert errors.rstrip().endswith("run: nothing started; fix the configuration above"), errors

    # The message is the one the process itself gives.
    edge_alone = subprocess.run(
        [sys.executable, "-m", "edge"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert edge_alone.returncode == 2
    assert edge_alone.stderr.strip() in errors, (edge_alone.stderr, errors)


README = PROJECT_ROOT / "README.md"
README_ORIGIN = "http://127.0.0.1:8080"


def json_documents(text: str) -> list[Any]:
    """The JSON documents curl printed one after another (without newlines between them)."""
    decoder = json.JSONDecoder()
    documents, position, text = [], 0, text.strip()
    while position < len(text):
        document, position = decoder.raw_decode(text, position)
        documents.append(document)
        while position < len(text) and text[position].isspace():
            position += 1
    return documents


def readme_api_commands() -> str:
    """The README's block of API commands, as a person would paste it."""
    text = README.read_text()
    start = text.index(f"```sh\nAPI={README_ORIGIN}/api/v1\n") + len("```sh\n")
    return text[start : text.index("```", start)]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (make test installs it)")
def test_the_readme_commands_run_as_written_against_a_started_stack(tmp_path: Path) -> None:
    commands = readme_api_commands()
    assert "<" not in commands.replace("<<", ""), "a placeholder left in the README's commands"
    work = tmp_path / "work"
    work.mkdir()
    with started_stack(tmp_path) as stack:
        completed = subprocess.run(
            ["/bin/bash", "-e", "-o", "pipefail", "-c", commands.replace(README_ORIGIN, stack.edge_url)],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert completed.returncode == 0, (completed, stack.output()[-3000:])
        with httpx.Client(trust_env=False) as client:
            calls = client.get(f"{stack.sim_url}/_sim/calls").json()
    assert completed.stderr == "", completed.stderr
    answers = json_documents(completed.stdout)
    text_turn, conversation, edge_ready, app_ready = answers
    assert text_turn["transcript"] == "Hello Rose, my dog is called Max."
    assert text_turn["audio_url"] is not None
    assert [message["role"] for message in conversation["messages"]] == ["user", "assistant", "user", "assistant"]
    assert conversation["messages"][2]["text"], conversation  # the recording's transcript
    assert edge_ready["status"] == "ready"
    assert app_ready["status"] == "ready"
    assert calls["transcribe"]["received"] == 1, calls
    # One request id from the edge's access line through the app to the simulator's.
    logged = [json.loads(line) for line in stack.output().splitlines() if line.startswith("{")]
    edge_ids = {line["request_id"] for line in logged if line["logger"] == "edge.access" and line["method"] == "POST"}
    speech_calls = [line for line in logged if line["logger"] == "sim.access" and "text-to-speech" in line["path"]]
    assert speech_calls, logged[-20:]
    assert {line.get("request_id") for line in speech_calls} <= edge_ids, (speech_calls, edge_ids)
    reply = (work / "reply.mp3").read_bytes()
    assert reply[:3] == b"ID3" or reply[:2] in (b"\xff\xfb", b"\xff\xf3"), reply[:16]
