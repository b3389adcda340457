"""A full disk, on the real thing: `python -m app` with its data directory on a small tmpfs
of its own (mounted by the test, as root), the provider simulators, memory and speech on
- SQLite, reply audio and the embedded Qdrant all on that filesystem.

Once a filler file has taken the last byte, turns are refused 507 `storage_full` in the
envelope with `Retry-After` and nothing internal, each logged once; the sessions read back
as they were, their reply audio too, and the database passes SQLite's integrity check.
Once the filler is gone, the same process takes turns again - and recalls what it
remembered before.

With PostgreSQL (`APP_DATABASE_URL`), the database itself answers SQLSTATE 53100
`disk_full` - raised by a trigger on the app's own tables, as PostgreSQL does when it
cannot extend a table's file - and the app answers 507 the same way: a turn whose reply
audio found no room is taken back whole. docs/app.md#when-the-disk-is-full.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql

from app.api.routes import NO_ROOM_FOR_SESSION, NO_ROOM_FOR_TURN
from tests.app_support import (
    POSTGRES_URL,
    ApiClient,
    MessageBody,
    Simulators,
    app_environment,
    app_process,
    error_of,
    new_port,
    postgres_schema,
    schema_url,
    sqlite_integrity,
)
from tests.sim_support import wav_file

FILESYSTEM_SIZE = "4m"
# A turn can still find room the filler left between its writes (the log SQLite already
# grew, a page partly used): fill again and retry, at most this often.
FILL_ATTEMPTS = 40


@pytest.fixture(autouse=True)
def fresh_sims(sims: Simulators) -> None:
    sims.reset()


@contextmanager
def small_filesystem(mount_point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at `mount_point`, owner-only, unmounted when left (lazily if
    something still holds it)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem to fill needs root (CI runs the tests as root)")
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if mounted.returncode != 0:
        pytest.skip(f"a tmpfs cannot be mounted here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=10).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=True, timeout=10)


def fill(filler: Path) -> None:
    """Appends to `filler` until the filesystem refuses a single byte more."""
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1):
            chunk = bytes(size)
            try:
                while True:
                    os.write(descriptor, chunk)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(descriptor)


def copy_log_back(database: Path) -> tuple[int, int]:
    """Copies every page of the write-ahead log into the database, and has the next writer
    start the log over (`wal_checkpoint(RESTART)`); (busy, pages left uncopied)."""
    connection = sqlite3.connect(database)
    try:
        busy, logged, copied = connection.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
    finally:
        connection.close()
    return int(busy), int(logged) - int(copied)


def assert_storage_full(response: httpx.Response, message: str, data_dir: Path) -> None:
    assert response.status_code == 507, response.text
    error = error_of(response)
    assert error["code"] == "storage_full", error
    assert error["message"] == message, error
    assert "details" not in error, error
    assert int(response.headers["retry-after"]) > 0, response.headers
    for internal in ("sqlite", "database or disk", "errno", "no space", str(data_dir), "/"):
        assert internal not in response.text.lower(), (internal, response.text)


def turns_of(messages: list[MessageBody]) -> list[tuple[str, str]]:
    return [(message["role"], message["text"]) for message in messages]


def log_lines(output: str) -> list[dict[str, str]]:
    lines = []
    for line in output.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_a_full_disk_refuses_turns_with_507_keeps_what_was_stored_and_recovers(
    sims: Simulators, tmp_path: Path
) -> None:
    with small_filesystem(tmp_path / "small", FILESYSTEM_SIZE) as small:
        data_dir = small / "data"
        filler = small / "filler"
        env = app_environment(sims, data_dir, new_port())
        with app_process(tmp_path / "logs", env) as app, ApiClient(app.url) as client:
            sessions = [client.create_session() for _ in range(3)]
            audio: dict[str, bytes] = {}
            for number, session_id in enumerate(sessions):
                # "my ..." is a fact about the speaker: the simulator's memory analyser keeps it.
                said = client.say(session_id, f"My sister number {number} is called Alma.")
                assert said["audio_url"] is not None, said
                audio[said["audio_url"]] = client.get(said["audio_url"]).content
                voice = client.voice_turn(session_id, wav_file(1.0, seed=number), filename="clip.wav")
                assert voice.status_code == 200, voice.text
            stored = {session_id: client.session(session_id)["messages"] for session_id in sessions}
            doomed = sessions.pop()  # deleted while the disk is full
            # What SQLite does by itself once its log reaches 1000 pages: copy it back into the
            # database, the next write starting the log over in the space it already has.
            assert copy_log_back(data_dir / "conversations.db") == (0, 0), "the log was not copied back whole"

            def refused_turn(session_id: str) -> httpx.Response:
                """A text turn the full disk refuses: filled again while turns still find room."""
                for attempt in range(FILL_ATTEMPTS):
                    fill(filler)
                    response = client.text_turn(session_id, f"Said on a full disk, try {attempt}.")
                    if response.status_code != 200:
                        return response
                    stored[session_id] = client.session(session_id)["messages"]  # room was found: kept whole
                raise AssertionError(f"every turn found room, {FILL_ATTEMPTS} fillings of the disk later")

            # The reply's audio is the first thing a turn writes. Its state then still fits
            # in the log SQLite reuses once copied back: saved on the way out, the person's
            # words without the reply - and taken back.
            assert_storage_full(refused_turn(sessions[0]), NO_ROOM_FOR_TURN, data_dir)
            assert client.session(sessions[0])["messages"] == stored[sessions[0]]
            # Without speech, the state is what finds no room, once the log is used up.
            sims.fault("speech", 503)
            assert_storage_full(refused_turn(sessions[1]), NO_ROOM_FOR_TURN, data_dir)
            sims.clear_faults()

            # Full: every turn refused, text or voice, several at once, and nothing of them kept.
            with ThreadPoolExecutor(max_workers=4) as pool:
                texts = list(pool.map(lambda session_id: client.text_turn(session_id, "Still full?"), sessions))
                voices = list(
                    pool.map(
                        lambda session_id: client.voice_turn(session_id, wav_file(0.5, seed=9), filename="clip.wav"),
                        sessions,
                    )
                )
            for response in [*texts, *voices]:
                assert_storage_full(response, NO_ROOM_FOR_TURN, data_dir)
            for session_id in sessions:
                # Taking a turn back is a write too: when even that finds no room, the words
                # stay without a reply, as when the language model is down - never more.
                now = client.session(session_id)["messages"]
                assert now[: len(stored[session_id])] == stored[session_id]
                left = now[len(stored[session_id]) :]
                assert len(left) <= 2, left
                assert {message["role"] for message in left} <= {"user"}, left
                stored[session_id] = now
            for url, content in audio.items():
                assert client.get(url).content == content
            assert sqlite_integrity(data_dir / "conversations.db") == "ok"

            # A new session is a checkpoint written at once: no room, no session.
            assert_storage_full(client.post_session(), NO_ROOM_FOR_SESSION, data_dir)
            # A deletion needs room in the database's log too: done, or refused and retried below.
            deletion = client.delete_session(doomed)
            if deletion.status_code == 507:
                assert error_of(deletion)["code"] == "storage_full"
                assert client.get_session(doomed).status_code == 200
            else:
                assert deletion.status_code == 204, deletion.text
                assert client.get_session(doomed).status_code == 404

            filler.unlink()
            for session_id in sessions:
                again = client.say(session_id, "Is my sister still remembered?")
                assert sims.context(again["transcript"])[1] >= 1, "the memory stored before the disk filled is lost"
                assert turns_of(client.session(session_id)["messages"]) == [
                    *turns_of(stored[session_id]),
                    ("user", "Is my sister still remembered?"),
                    ("assistant", again["reply"]),
                ]
            voice = client.voice_turn(sessions[1], wav_file(1.0, seed=7), filename="clip.wav")
            assert voice.status_code == 200, voice.text
            assert client.post_session().status_code == 201
            if deletion.status_code == 507:
                assert client.delete_session(doomed).status_code == 204
            assert client.get_session(doomed).status_code == 404

            refusals = [line for line in log_lines(app.stdout()) if line["message"].startswith("no room left to store")]
            answered_507 = 2 + len(texts) + len(voices) + 1 + (deletion.status_code == 507)
            assert len(refusals) == answered_507, refusals
            assert {line["level"] for line in refusals} == {"error"}
            # Both stores were found full: the audio's file (OSError) and SQLite's log.
            assert {line["message"].rsplit("(", 1)[1] for line in refusals} >= {"OSError)", "OperationalError)"}
            for line in log_lines(app.stdout()):
                assert line["level"] != "error" or line in refusals, line  # no "unhandled error" among them
                for session_id in [*sessions, doomed]:
                    assert session_id not in json.dumps(line), line
        assert sqlite_integrity(data_dir / "conversations.db") == "ok"


# -- PostgreSQL ----------------------------------------------------------------------------------------------


@contextmanager
def disk_full_on(schema: str, *tables: str) -> Iterator[None]:
    """While entered, every insert into `tables` of `schema` fails as PostgreSQL fails one
    it has no room for: SQLSTATE 53100, from the server."""
    function = sql.Identifier(schema, "no_room")
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(
            sql.SQL(
                "CREATE FUNCTION {} () RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full'; "
                "END $$"
            ).format(function)
        )
        for table in tables:
            admin.execute(
                sql.SQL("CREATE TRIGGER no_room BEFORE INSERT ON {} FOR EACH ROW EXECUTE FUNCTION {} ()").format(
                    sql.Identifier(schema, table), function
                )
            )
        try:
            yield
        finally:
            admin.execute(sql.SQL("DROP FUNCTION {} () CASCADE").format(function))


def test_postgresql_out_of_room_is_507_and_the_turn_is_taken_back(sims: Simulators, tmp_path: Path) -> None:
    with postgres_schema() as schema:
        env = app_environment(sims, tmp_path / "data", new_port(), APP_DATABASE_URL=schema_url(schema))
        with app_process(tmp_path / "logs", env) as app, ApiClient(app.url) as client:
            session_id = client.create_session()
            client.say(session_id, "My brother is called Tomas.")
            stored = client.session(session_id)["messages"]

            # The run saves its way out after the audio failed - the words without the reply -
            # in a database with room for that: taken back.
            with disk_full_on(schema, "reply_audio"):
                assert_storage_full(client.text_turn(session_id, "Is this kept?"), NO_ROOM_FOR_TURN, tmp_path)
                assert client.session(session_id)["messages"] == stored
            with disk_full_on(schema, "reply_audio", "checkpoints"):
                assert_storage_full(client.text_turn(session_id, "Is this kept?"), NO_ROOM_FOR_TURN, tmp_path)
                sims.fault("speech", 503)  # no audio to write: the state is what finds no room
                assert_storage_full(client.text_turn(session_id, "Is this kept?"), NO_ROOM_FOR_TURN, tmp_path)
                sims.clear_faults()
                assert_storage_full(client.post_session(), NO_ROOM_FOR_SESSION, tmp_path)
                assert client.session(session_id)["messages"] == stored

            again = client.say(session_id, "Is this kept?")
            assert again["audio_url"] is not None, again
            assert turns_of(client.session(session_id)["messages"]) == [
                *turns_of(stored),
                ("user", "Is this kept?"),
                ("assistant", again["reply"]),
            ]
            refusals = [line for line in log_lines(app.stdout()) if line["message"].startswith("no room left to store")]
            assert [line["message"].rsplit("(", 1)[1] for line in refusals] == ["DiskFull)"] * 4, refusals
