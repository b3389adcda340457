"""A voice turn's upload never reaches the disk (app/api/uploads.py, docs/data.md#files):
`python -m app` with a temporary directory of its own receives a 3 MiB recording, slowly;
while the body is half sent, the process holds no file in that directory (Starlette would
have spooled the part to one past 1 MiB)."""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.app_support import API, ApiClient, Simulators, app_environment, app_process, new_port, start_simulators


@pytest.fixture(scope="module")
def sims() -> Iterator[Simulators]:
    started = start_simulators()
    yield started
    started.stop()


def open_files_under(pid: int, directory: Path) -> list[str]:
    found = []
    for descriptor in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(descriptor)
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith(str(directory)):
            found.append(target)
    return found


def test_a_recording_is_parsed_in_memory_not_spooled_to_disk(sims: Simulators, tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = app_environment(sims, tmp_path / "data", new_port(), TMPDIR=str(scratch))
    with app_process(tmp_path / "logs", env) as app, ApiClient(app.url) as api:
        session_id = api.create_session()
        boundary = secrets.token_hex(8)
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename="clip.webm"\r\n'
            "Content-Type: audio/webm\r\n\r\n"
        ).encode()
        body = head + secrets.token_bytes(3 * 1024 * 1024) + f"\r\n--{boundary}--\r\n".encode()
        request = (
            f"POST {API}/sessions/{session_id}/turns HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", app.port), timeout=10) as connection:
            connection.sendall(request + body[: len(body) - 1024])
            time.sleep(1.0)  # the parser has had 3 MiB of the part
            held = open_files_under(app.process.pid, scratch)
            connection.sendall(body[len(body) - 1024 :])
            answer = connection.recv(65536)
        assert held == []
        assert answer.startswith(b"HTTP/1.1 4"), answer[:200]  # random bytes: no recording it accepts
        assert list(scratch.iterdir()) == []
