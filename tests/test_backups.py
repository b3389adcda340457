"""Backups, restores and the start-up integrity check, with `python -m app` and
`python -m app.ops` as real processes on the simulators (docs/data.md).

The restore drill: sessions with turns and memories, one deleted; a backup taken while the
app serves; the database deleted - and, separately, corrupted - with the app stopped; the
backup restored; the app started on it: every session back with its turns and memories, the
deleted one still deleted. And the operations command's sweep.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.storage import backup
from tests.app_support import (
    POSTGRES_URL,
    ApiClient,
    Simulators,
    app_environment,
    app_process,
    new_port,
    start_app_process,
    start_simulators,
)
from tests.processes import PROJECT_ROOT
from tests.servers import serve, wait_until

FACTS = {"Ada": "My dog is called Max", "Bob": "My sister lives in Lisbon"}


@pytest.fixture(scope="module")
def sims() -> Iterator[Simulators]:
    started = start_simulators()
    yield started
    started.stop()


@dataclass
class Setup:
    sims: Simulators
    data_dir: Path
    logs: Path
    env: dict[str, str]

    def ops(self, *arguments: str, **overrides: str) -> subprocess.CompletedProcess[str]:
        return run_ops(self.env | overrides, *arguments)


def run_ops(env: Mapping[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.ops", *arguments],
        cwd=PROJECT_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def setup(sims: Simulators, tmp_path: Path) -> Setup:
    data_dir = tmp_path / "data"
    env = app_environment(sims, data_dir, new_port(), APP_BACKUP_INTERVAL_HOURS="0")
    return Setup(sims, data_dir, tmp_path / "logs", env)


@dataclass
class Conversations:
    sessions: dict[str, str]  # person -> session id
    turns: dict[str, list[str]]  # session id -> what was said
    deleted: str


def converse(api: ApiClient) -> Conversations:
    sessions, turns = {}, {}
    for person, fact in FACTS.items():
        session_id = api.create_session()
        said = [api.say(session_id, text)["transcript"] for text in (f"Hello, I am {person}.", fact)]
        sessions[person], turns[session_id] = session_id, said
    deleted = api.create_session()
    api.say(deleted, "My cat is called Tom")
    assert api.delete_session(deleted).status_code == 204
    return Conversations(sessions, turns, deleted)


def wait_for_memories(data_dir: Path, sessions: Iterable[str]) -> None:
    """A turn's memory is written after its answer: until each session's collection is on disk."""
    deadline = time.monotonic() + 30
    for session_id in sessions:
        while not (data_dir / "qdrant" / "collection" / f"memories-{session_id}" / "storage.sqlite").exists():
            assert time.monotonic() < deadline, "a session's memory was never written"
            time.sleep(0.05)


def assert_all_back(api: ApiClient, sims: Simulators, conversations: Conversations) -> None:
    for session_id, said in conversations.turns.items():
        messages = api.session(session_id)["messages"]
        assert [message["text"] for message in messages if message["role"] == "user"] == said
        assert [message["role"] for message in messages] == ["user", "assistant"] * len(said)
        # Its memory came back with it: the model is given it for a question about it.
        asked = api.say(session_id, f"What do you remember about me? {secrets.token_hex(4)}")
        assert sims.context(asked["transcript"])[1] >= 1, "the session's memories were not restored"
    assert api.get_session(conversations.deleted).status_code == 404


def backups_in(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "backups").glob("backup-*.tar.gz"))


def test_the_restore_drill_after_the_database_is_deleted(setup: Setup) -> None:
    with app_process(setup.logs, setup.env) as app, ApiClient(app.url) as api:
        conversations = converse(api)
        wait_for_memories(setup.data_dir, conversations.sessions.values())
        taken = setup.ops("backup")  # online: the app keeps serving
        assert taken.returncode == 0, taken.stderr
        later = api.create_session()  # after the backup: not in it
    [made] = backups_in(setup.data_dir)
    assert str(made) in taken.stdout
    assert "sha256 " in taken.stdout
    listed = setup.ops("backups")
    assert listed.returncode == 0
    assert made.name in listed.stdout
    assert "not verified" not in listed.stdout
    # Nothing of a session's id in what is printed.
    for session_id in [*conversations.sessions.values(), conversations.deleted]:
        assert session_id not in taken.stdout + listed.stdout

    database = setup.data_dir / "conversations.db"
    database.unlink()
    restored = setup.ops("restore", str(made))
    assert restored.returncode == 0, restored.stderr
    replaced = next(setup.data_dir.glob("replaced-*"))
    assert (replaced / "qdrant").is_dir()  # what was there is kept aside

    with app_process(setup.logs, setup.env) as app, ApiClient(app.url) as api:
        assert_all_back(api, setup.sims, conversations)
        assert api.get_session(later).status_code == 404


def test_a_corrupt_database_stops_the_start_unless_restoring_is_asked_for(setup: Setup) -> None:
    with app_process(setup.logs, setup.env) as app, ApiClient(app.url) as api:
        conversations = converse(api)
        wait_for_memories(setup.data_dir, conversations.sessions.values())
        assert setup.ops("backup").returncode == 0
    [made] = backups_in(setup.data_dir)
    corrupt(setup.data_dir / "conversations.db")

    refused = start_app_process(setup.logs, setup.env)
    assert refused.wait(30) == 3
    said = refused.stderr()
    assert "quick check" in said
    assert str(made) in said
    assert f"python -m app.ops restore {made}" in said
    assert "Traceback" not in refused.output()

    env = setup.env | {"APP_RESTORE_ON_CORRUPTION": "true"}
    with app_process(setup.logs, env) as app, ApiClient(app.url) as api:
        assert_all_back(api, setup.sims, conversations)
        assert "restored from the newest verified backup" in app.stdout()
        assert made.name in app.stdout()


def corrupt(database: Path) -> None:
    """Overwrites the heads of pages after the first: the b-tree pages' types and cell counts."""
    size = database.stat().st_size
    assert size >= 4 * 4096, size
    with database.open("r+b") as file:
        for page in range(1, size // 4096):
            file.seek(page * 4096)
            file.write(secrets.token_bytes(16))
    assert backup.integrity_problem(database) is not None


def test_a_restore_is_refused_while_the_app_runs_and_keeps_the_data(setup: Setup) -> None:
    with app_process(setup.logs, setup.env) as app, ApiClient(app.url) as api:
        session_id = api.create_session()
        api.say(session_id, "Hello there")
        assert setup.ops("backup").returncode == 0
        api.say(session_id, "Still here")
        [made] = backups_in(setup.data_dir)
        refused = setup.ops("restore", str(made))
        assert refused.returncode == 3, refused.stderr
        assert "in use by an app process" in refused.stderr
        assert len(api.session(session_id)["messages"]) == 4
        # A second app on the same data is refused the same way.
        second = start_app_process(setup.logs, setup.env | {"APP_PORT": str(new_port())})
        assert second.wait(30) == 3
        assert "in use by an app process" in second.stderr()


def test_backups_are_verified_owner_only_and_tampering_is_found(setup: Setup) -> None:
    with app_process(setup.logs, setup.env) as app, ApiClient(app.url) as api:
        session_id = api.create_session()
        api.say(session_id, "My dog is called Max")
        wait_for_memories(setup.data_dir, [session_id])
    assert setup.ops("backup").returncode == 0
    [made] = backups_in(setup.data_dir)
    directory = made.parent
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert {path.name for path in directory.iterdir()} == {made.name, made.name + ".sha256"}
    assert setup.ops("verify", str(made)).returncode == 0
    with tarfile.open(made) as archive:
        names = archive.getnames()
    assert names[0] == "manifest.json"
    assert "conversations.db" in names
    assert any(name.startswith("qdrant/collection/") and name.endswith("/storage.sqlite") for name in names)

    # One flipped byte: the recorded checksum no longer matches.
    content = bytearray(made.read_bytes())
    content[len(content) // 2] ^= 0xFF
    made.write_bytes(bytes(content))
    checked = setup.ops("verify", str(made))
    assert checked.returncode == 1
    assert "checksum" in checked.stderr
    # Without the recorded checksum the archive itself is found unreadable or inconsistent.
    (directory / (made.name + ".sha256")).unlink()
    checked = setup.ops("verify", str(made))
    assert checked.returncode == 1, checked.stdout
    assert "not verified" in setup.ops("backups").stdout


def test_one_backup_at_a_time(setup: Setup) -> None:
    with app_process(setup.logs, setup.env) as app, ApiClient(app.url) as api:
        api.say(api.create_session(), "Hello there")
    # Another process taking one: it holds the backup lock (as Checkpoints.only_one takes it).
    descriptor = os.open(setup.data_dir / "backup.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused = setup.ops("backup")
        assert refused.returncode == 3, refused.stderr
        assert "another process is taking a backup now" in refused.stderr
        assert backups_in(setup.data_dir) == []
    finally:
        os.close(descriptor)
    assert setup.ops("backup").returncode == 0


def test_the_app_backs_up_on_its_schedule_and_keeps_the_newest(setup: Setup) -> None:
    # Every 2.7 s; the first after one interval (less than the first backup's usual delay).
    env = setup.env | {"APP_BACKUP_INTERVAL_HOURS": "0.00075", "APP_BACKUP_KEEP": "2"}
    with app_process(setup.logs, env) as app, ApiClient(app.url) as api:
        api.say(api.create_session(), "Hello there")
        assert wait_until(lambda: "backup taken" in app.stdout() and len(backups_in(setup.data_dir)) >= 2, 20)
        assert wait_until(lambda: app.stdout().count("backup taken") >= 3, 20)
        assert len(backups_in(setup.data_dir)) == 2
    for made in backups_in(setup.data_dir):
        assert setup.ops("verify", str(made)).returncode == 0


def test_the_commands_explain_themselves_and_fail_clearly(setup: Setup) -> None:
    for command in ("backup", "backups", "verify", "restore", "sweep"):
        helped = setup.ops(command, "--help")
        assert helped.returncode == 0
        assert "usage: python -m app.ops" in helped.stdout
    assert setup.ops().returncode == 2
    bad = setup.ops("backups", APP_BACKUP_KEEP="none")
    assert bad.returncode == 2
    assert "APP_BACKUP_KEEP" in bad.stderr
    missing = setup.ops("verify", str(setup.data_dir / "nothing.tar.gz"))
    assert missing.returncode == 1
    assert "not a file" in missing.stderr
    assert "no backups" in setup.ops("backups").stdout
    assert "Traceback" not in missing.stderr
    # A data directory the app never ran on: an empty backup, and a sound one.
    assert setup.ops("backup").returncode == 0
    [made] = backups_in(setup.data_dir)
    checked = setup.ops("verify", str(made))
    assert checked.returncode == 0
    assert "sqlite" in checked.stdout
    assert "0 sessions" in checked.stdout


def test_the_sweep_command_lists_then_deletes_what_is_past_its_retention(setup: Setup) -> None:
    with app_process(setup.logs, setup.env) as app, ApiClient(app.url) as api:
        old = [api.create_session() for _ in range(2)]
        api.say(old[0], "My dog is called Max")
        running = setup.ops("sweep", "--dry-run")
        assert running.returncode == 3, running.stderr  # the app sweeps by itself; one process at a time
        assert "in use by an app process" in running.stderr
    time.sleep(12)
    with app_process(setup.logs, setup.env) as app, ApiClient(app.url) as api:
        fresh = api.create_session()
        fresh_at = time.time()

    def retention() -> dict[str, str]:
        """Long enough for the fresh session still while the command starts (seconds, on a
        busy machine), never for the old ones (12 s older)."""
        return {"APP_SESSION_RETENTION_DAYS": str((time.time() - fresh_at + 10) / 86400)}

    listed = setup.ops("sweep", "--dry-run", **retention())
    assert listed.returncode == 0, listed.stderr
    assert "would delete 2 sessions" in listed.stdout
    assert len([line for line in listed.stdout.splitlines() if line.strip().startswith("session ")]) == 2
    for session_id in [*old, fresh]:
        assert session_id not in listed.stdout
    swept = setup.ops("sweep", **retention())
    assert swept.returncode == 0, swept.stderr
    assert "deleted 2 sessions" in swept.stdout
    assert "would delete 0 sessions" in setup.ops("sweep", "--dry-run", **retention()).stdout
    with app_process(setup.logs, setup.env) as app, ApiClient(app.url) as api:
        assert [api.get_session(session_id).status_code for session_id in old] == [404, 404]
        assert api.get_session(fresh).status_code == 200


# -- PostgreSQL ----------------------------------------------------------------------------------------------


@pytest.fixture
def database_url() -> Iterator[str]:
    name = f"backups_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def test_the_restore_drill_on_postgresql(setup: Setup, database_url: str) -> None:
    # Memory off: with PostgreSQL the memories belong in a Qdrant server, which is not here.
    env = setup.env | {"APP_DATABASE_URL": database_url, "APP_FEATURE_MEMORY": "false"}
    with app_process(setup.logs, env) as app, ApiClient(app.url) as api:
        kept = api.create_session()
        said = [api.say(kept, text)["transcript"] for text in ("Hello, I am Ada.", "My dog is called Max")]
        deleted = api.create_session()
        assert api.delete_session(deleted).status_code == 204
        taken = setup.ops("backup", APP_DATABASE_URL=database_url, APP_FEATURE_MEMORY="false")
        assert taken.returncode == 0, taken.stderr
        [made] = backups_in(setup.data_dir)
        refused = setup.ops("restore", str(made), APP_DATABASE_URL=database_url)
        assert refused.returncode == 1
        assert "running app" in refused.stderr
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("DELETE FROM checkpoints")
        connection.execute("DELETE FROM checkpoint_blobs")
        connection.execute("DELETE FROM checkpoint_writes")
    assert setup.ops("verify", str(made)).returncode == 0
    restored = setup.ops("restore", str(made), APP_DATABASE_URL=database_url)
    assert restored.returncode == 0, restored.stderr
    # What it replaced was backed up first, beside it.
    assert len(backups_in(setup.data_dir)) == 2
    with app_process(setup.logs, env) as app, ApiClient(app.url) as api:
        messages = api.session(kept)["messages"]
        assert [message["text"] for message in messages if message["role"] == "user"] == said
        assert api.get_session(deleted).status_code == 404


@dataclass
class FakeQdrant:
    """Qdrant's snapshot API as its documentation gives it, for the one collection: create,
    download, delete, upload (with `priority=snapshot`); the api-key checked on each."""

    content: bytes
    key: str
    uploaded: list[bytes]
    deleted: list[str]

    def app(self) -> Starlette:
        snapshots = "/collections/memories/snapshots"

        def authorised(request: Request) -> bool:
            return request.headers.get("api-key") == self.key

        async def create(request: Request) -> Response:
            if not authorised(request):
                return JSONResponse({"status": {"error": "forbidden"}}, status_code=403)
            return JSONResponse({"result": {"name": "memories-1.snapshot", "size": len(self.content)}, "status": "ok"})

        async def download(request: Request) -> Response:
            if not authorised(request) or request.path_params["name"] != "memories-1.snapshot":
                return Response(status_code=404)
            return Response(self.content, media_type="application/octet-stream")

        async def delete(request: Request) -> Response:
            self.deleted.append(request.path_params["name"])
            return JSONResponse({"result": True, "status": "ok"})

        async def upload(request: Request) -> Response:
            if not authorised(request) or request.query_params.get("priority") != "snapshot":
                return JSONResponse({"status": {"error": "bad request"}}, status_code=400)
            form = await request.form()
            snapshot = form["snapshot"]
            assert not isinstance(snapshot, str)
            self.uploaded.append(await snapshot.read())
            return JSONResponse({"result": True, "status": "ok"})

        return Starlette(
            routes=[
                Route(snapshots, create, methods=["POST"]),
                Route(f"{snapshots}/upload", upload, methods=["POST"]),
                Route(snapshots + "/{name}", download, methods=["GET"]),
                Route(snapshots + "/{name}", delete, methods=["DELETE"]),
            ]
        )


def test_with_a_qdrant_server_its_snapshot_is_backed_up_and_restored(setup: Setup, database_url: str) -> None:
    fake = FakeQdrant(secrets.token_bytes(100_000), secrets.token_hex(8), [], [])
    server = serve(fake.app())
    try:
        env = {
            "APP_DATABASE_URL": database_url,
            "APP_QDRANT_URL": server.url,
            "APP_QDRANT_API_KEY": fake.key,
            "APP_FEATURE_MEMORY": "true",
        }
        # The tables, made by an app that started once (memory off: it would reach Qdrant).
        with app_process(setup.logs, setup.env | {"APP_DATABASE_URL": database_url, "APP_FEATURE_MEMORY": "false"}):
            pass
        taken = setup.ops("backup", **env)
        assert taken.returncode == 0, taken.stderr
        assert fake.deleted == ["memories-1.snapshot"]  # not left on the server
        [made] = backups_in(setup.data_dir)
        with tarfile.open(made) as archive:
            member = archive.extractfile("qdrant/memories.snapshot")
            assert member is not None
            assert member.read() == fake.content
        restored = setup.ops("restore", str(made), **env)
        assert restored.returncode == 0, restored.stderr
        assert fake.uploaded == [fake.content]
    finally:
        server.stop()
