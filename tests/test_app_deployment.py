"""How `python -m app` meets a platform (docs/deployment.md): `APP_HOST=::` (an IPv6-only
private network) serves IPv4 clients too, on one dual-stack socket (common/listen.py); a
volume mounted owned by root is given to `APP_RUN_AS_USER`, which the process becomes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.app_support import API, Simulators, app_environment, app_process, new_port
from tests.processes import PROJECT_ROOT


def test_the_app_on_all_ipv6_addresses_answers_ipv4_and_ipv6_clients(sims: Simulators, tmp_path: Path) -> None:
    port = new_port()
    env = app_environment(sims, tmp_path / "data", port, APP_HOST="::")
    with app_process(tmp_path / "logs", env), httpx.Client(trust_env=False, timeout=5) as client:
        for origin in (f"http://127.0.0.1:{port}", f"http://[::1]:{port}"):
            assert client.get(f"{origin}{API}/health").json() == {"status": "alive"}, origin


RUN_AS = (10001, 10001)


def owners(directory: Path) -> set[tuple[int, int]]:
    paths = [directory, *directory.rglob("*")]
    return {(path.lstat().st_uid, path.lstat().st_gid) for path in paths}


def interpreter_reachable_by(uid: int) -> bool:
    """Whether a Python started as root can still import its standard library once it has
    become `uid` (this machine's interpreter lives under /root, 0700: it cannot; in the
    images it can)."""
    drop_then_import = f"import os; os.setgroups([]); os.setgid({uid}); os.setuid({uid}); import encodings.punycode"
    probe = subprocess.run([sys.executable, "-c", drop_then_import], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: it is about a process started as root")
@pytest.mark.skipif(
    os.geteuid() == 0 and not interpreter_reachable_by(10001),
    reason="this Python's standard library is unreadable to uid 10001 (the container tests run the image as root)",
)
def test_started_as_root_the_app_gives_its_volume_to_its_user_and_becomes_it(sims: Simulators) -> None:
    # Not under pytest's tmp_path: that is root's alone (0700), where the user could not go.
    volume = Path(tempfile.mkdtemp(prefix="voice-volume-"))
    try:
        volume.chmod(0o755)
        data = volume / "data"
        data.mkdir()
        (data / "left-by-root").write_bytes(b"x")  # what a root-owned volume holds
        assert owners(data) == {(0, 0)}
        port = new_port()
        env = app_environment(sims, data, port, APP_RUN_AS_USER=f"{RUN_AS[0]}:{RUN_AS[1]}")
        with app_process(volume / "logs", env) as app, httpx.Client(trust_env=False, timeout=5) as client:
            session = client.post(f"{app.url}{API}/sessions")
            assert session.status_code == 201, app.output()
            status = Path(f"/proc/{app.process.pid}/status").read_text()
            ids = {line.split(":")[0]: line.split()[1:] for line in status.splitlines() if line[:4] in ("Uid:", "Gid:")}
            groups = next(line for line in status.splitlines() if line.startswith("Groups:"))
        assert ids == {"Uid": [str(RUN_AS[0])] * 4, "Gid": [str(RUN_AS[1])] * 4}, status
        assert groups.split() == ["Groups:"], groups
        # Everything in the volume is the user's: what root left, and what the app made.
        assert owners(data) == {RUN_AS}
        assert len(list(data.rglob("*"))) > 1
    finally:
        shutil.rmtree(volume)


def test_run_as_user_must_be_uid_and_gid(sims: Simulators, tmp_path: Path) -> None:
    env = {**os.environ, **app_environment(sims, tmp_path / "data", new_port(), APP_RUN_AS_USER="app")}
    completed = subprocess.run(
        [sys.executable, "-m", "app"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 2
    assert "APP_RUN_AS_USER: must be uid:gid, two numbers (e.g. 10001:10001)" in completed.stderr
    assert "Traceback" not in completed.stderr
