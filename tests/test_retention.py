"""Retention that really deletes (docs/app.md, `Companion.sweep`), on the real app in a thread
in front of the provider simulators, with real SQLite files, a real PostgreSQL schema and
the embedded Qdrant:

- a session idle past APP_SESSION_RETENTION_DAYS goes with every row of it (SQLite's
  `checkpoints` and `writes`; PostgreSQL's `checkpoints`, `checkpoint_blobs`,
  `checkpoint_writes` and `reply_audio`), its memories and its audio; a fresh one stays
  whole; a dry run reports the same session and deletes nothing;
- a turn that reaches an expired session while the sweep is deleting it keeps it;
- one process sweeps at a time (`Checkpoints.only_one`): a second holder is refused, not
  kept waiting, and the sweep skips while another process holds it.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Literal

import psycopg
import pytest
from prometheus_client import Counter

from app.companion import SweepReport
from app.settings import AppSettings
from app.storage.stores import open_stores
from tests.app_support import (
    API,
    ApiClient,
    AppThread,
    Simulators,
    TurnBody,
    app_settings,
    postgres_schema,
    running_app,
    schema_url,
)

Store = Literal["sqlite", "postgresql"]

RETENTION_S = 1.5  # APP_SESSION_RETENTION_DAYS, in seconds

pytestmark = pytest.mark.usefixtures("fresh_sims")


@pytest.fixture
def database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None for SQLite; else a schema of its own in the test database, dropped afterwards."""
    if request.param == "sqlite":
        yield None
        return
    with postgres_schema() as schema:
        yield schema_url(schema)


both_stores = pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)


def retention_settings(sims: Simulators, data_dir: Path, database_url: str | None) -> AppSettings:
    return app_settings(sims, data_dir, database_url=database_url, session_retention_days=RETENTION_S / 86400)


def sweep(app: AppThread, *, dry_run: bool = False) -> SweepReport:
    return app.run(app.companion.sweep(dry_run=dry_run), timeout=30)


def audio_id_of(turn: TurnBody) -> str:
    url = turn["audio_url"]
    assert url is not None, turn
    assert url.startswith(f"{API}/audio/"), url
    return url.removeprefix(f"{API}/audio/")


def counted(counter: Counter) -> float:
    (family,) = counter.collect()
    return sum(sample.value for sample in family.samples if sample.name.endswith("_total"))


def fingerprint(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()[:12]


# -- what a session left, read from the files and the database themselves ------------------------------------


def rows_left(settings: AppSettings, session_id: str, audio_ids: list[str]) -> dict[str, int]:
    """Live rows of the session in each table of its store, reply audio included."""
    if settings.database_url is None:
        database = settings.data_dir / "conversations.db"
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
            count = "SELECT count(*) FROM {} WHERE thread_id = ?"
            return {
                table: connection.execute(count.format(table), (session_id,)).fetchone()[0]
                for table in ("checkpoints", "writes")
            }
    with psycopg.connect(settings.database_url, connect_timeout=5) as connection:
        counts = {}
        for table in ("checkpoints", "checkpoint_blobs", "checkpoint_writes"):
            row = connection.execute(f"SELECT count(*) FROM {table} WHERE thread_id = %s", (session_id,)).fetchone()
            counts[table] = int(row[0]) if row else 0
        row = connection.execute("SELECT count(*) FROM reply_audio WHERE audio_id = ANY(%s)", (audio_ids,)).fetchone()
        counts["reply_audio"] = int(row[0]) if row else 0
    return counts


def audio_files(settings: AppSettings, audio_ids: list[str]) -> list[str]:
    return sorted(path.name for audio_id in audio_ids for path in (settings.data_dir / "audio").glob(f"{audio_id}.*"))


def memory_collection(settings: AppSettings, session_id: str) -> Path:
    """The embedded Qdrant's directory of the session's memories."""
    return settings.data_dir / "qdrant" / "collection" / f"memories-{session_id}"


async def leave_a_pending_write(app: AppThread, session_id: str) -> None:
    """What a run stopped part-way leaves beside the latest checkpoint, through the saver:
    a turn that finishes leaves none, so without it the check of the writes could not fail."""
    saver = app.companion.checkpoints.saver
    latest = await saver.aget_tuple({"configurable": {"thread_id": session_id}})
    assert latest is not None
    await saver.aput_writes(latest.config, [("turn", {"turn_id": "stopped"})], "stopped-task")


def talked(client: ApiClient, session_id: str, *sentences: str) -> list[str]:
    """Text turns, each answered with speech; their audio ids."""
    turns = [client.say(session_id, sentence) for sentence in sentences]
    for turn in turns:
        assert turn["degraded"] == [], turn
    return [audio_id_of(turn) for turn in turns]


# -- the sweep ----------------------------------------------------------------------------------------------


@both_stores
def test_an_idle_session_goes_with_every_row_memory_and_audio_and_a_fresh_one_stays(
    sims: Simulators, tmp_path: Path, database_url: str | None
) -> None:
    settings = retention_settings(sims, tmp_path / "data", database_url)
    with running_app(settings) as app, ApiClient(app.url) as client:
        idle = client.create_session()
        idle_audio = talked(client, idle, "My tortoise Quillfeather sleeps under the lantern", "I walk her at noon")
        last_turn = time.time()
        time.sleep(RETENTION_S + 0.3)
        fresh = client.create_session()
        fresh_audio = talked(client, fresh, "My sister lives in Lisbon")

        app.run(leave_a_pending_write(app, idle))
        before = rows_left(settings, idle, idle_audio)
        assert all(before.values()), before  # a row in every table
        assert app.memory_count(idle) >= 1
        assert memory_collection(settings, idle).is_dir()
        fresh_rows, fresh_memories = rows_left(settings, fresh, fresh_audio), app.memory_count(fresh)
        assert fresh_memories >= 1
        if settings.database_url is None:
            assert len(audio_files(settings, idle_audio + fresh_audio)) == 3

        # A dry run: what would go, and nothing gone.
        dry = sweep(app, dry_run=True)
        assert (dry.dry_run, dry.held_elsewhere, dry.audio) == (True, False, 0), dry
        assert [entry.fingerprint for entry in dry.sessions] == [fingerprint(idle)], dry
        assert idle not in repr(dry)
        assert fresh not in repr(dry)
        assert abs(datetime.fromisoformat(dry.sessions[0].idle_since).timestamp() - last_turn) < 2, dry
        assert rows_left(settings, idle, idle_audio) == before
        assert client.get_session(idle).status_code == 200
        assert counted(app.companion.metrics.sessions_expired) == 0

        swept = sweep(app)
        assert (swept.dry_run, swept.held_elsewhere, swept.sessions) == (False, False, dry.sessions), swept
        assert counted(app.companion.metrics.sessions_expired) == 1
        assert counted(app.companion.metrics.sessions_deleted) == 0  # deleted by retention, not its owner

        # The idle session: no row, no memory, no audio.
        assert rows_left(settings, idle, idle_audio) == dict.fromkeys(before, 0)
        assert not memory_collection(settings, idle).exists()
        assert app.memory_count(idle) == 0
        assert audio_files(settings, idle_audio) == []
        assert client.get_session(idle).status_code == 404
        for audio_id in idle_audio:
            assert client.get(f"{API}/audio/{audio_id}").status_code == 404

        # The fresh one: whole.
        assert rows_left(settings, fresh, fresh_audio) == fresh_rows
        assert app.memory_count(fresh) == fresh_memories
        assert client.session(fresh)["messages"][0]["text"] == "My sister lives in Lisbon"
        assert client.get(f"{API}/audio/{fresh_audio[0]}").status_code == 200

        # Nothing left to sweep.
        assert sweep(app).sessions == ()


def test_reply_audio_past_its_own_retention_is_counted_by_a_dry_run_then_deleted(
    sims: Simulators, tmp_path: Path
) -> None:
    settings = app_settings(sims, tmp_path / "data", audio_retention_hours=RETENTION_S / 3600, feature_memory=False)
    with running_app(settings) as app, ApiClient(app.url) as client:
        session_id = client.create_session()
        old = talked(client, session_id, "Say it out loud.")
        time.sleep(RETENTION_S + 0.3)
        new = talked(client, session_id, "And again.")

        dry = sweep(app, dry_run=True)
        assert (dry.audio, dry.sessions) == (1, ()), dry
        assert audio_files(settings, old + new) != []
        assert len(audio_files(settings, old + new)) == 2

        swept = sweep(app)
        assert (swept.audio, swept.sessions) == (1, ()), swept
        assert audio_files(settings, old) == []
        assert len(audio_files(settings, new)) == 1
        assert counted(app.companion.metrics.audio_expired) == 1
        assert len(client.session(session_id)["messages"]) == 4  # the session itself is not idle


def test_a_turn_that_reaches_an_expired_session_during_the_sweep_keeps_it(sims: Simulators, tmp_path: Path) -> None:
    """The sweep finds the session idle while a slow turn runs in it, then waits for the
    session's turn to end: the turn saved, the session is not idle any more, and stays."""
    settings = retention_settings(sims, tmp_path / "data", None)
    with running_app(settings) as app, ApiClient(app.url) as client:
        session_id = client.create_session()
        talked(client, session_id, "My dog is called Max")
        time.sleep(RETENTION_S + 0.3)
        assert len(sweep(app, dry_run=True).sessions) == 1

        sims.fault("chat", 200, times=1, delay_ms=2000)  # the next reply takes 2 s
        received = sims.calls()["chat"]
        turn: list[TurnBody] = []
        slow = threading.Thread(target=lambda: turn.append(client.say(session_id, "Max chased a cat today")))
        slow.start()
        deadline = time.monotonic() + 5
        while sims.calls()["chat"] == received:  # the turn has the session and waits for its reply
            assert time.monotonic() < deadline, "the slow turn never reached the model"
            time.sleep(0.02)
        swept = sweep(app)
        slow.join(10)

        assert swept.sessions == (), swept
        assert swept.seconds > 1.0, swept  # it found the session and waited for the turn to end
        assert len(turn) == 1
        assert turn[0]["reply"], turn
        assert client.session(session_id)["messages"][2]["text"] == "Max chased a cat today"
        assert app.memory_count(session_id) >= 1


# -- one process sweeps at a time ----------------------------------------------------------------------------


async def holders_of(settings: AppSettings, other: AppSettings) -> None:
    """Two stores on one database (two pools, or two SQLite connections and lock files
    opened twice): one holds a job, the other is refused at once, then has it once it
    is released; another job, or the same job on another store, is not held by it."""
    async with open_stores(settings) as first, open_stores(settings) as second, open_stores(other) as elsewhere:
        async with first.checkpoints.only_one("backup") as held:
            assert held
            started = time.monotonic()
            async with second.checkpoints.only_one("backup") as refused:
                assert not refused
            assert time.monotonic() - started < 1.0  # never waits
            async with second.checkpoints.only_one("sweep") as another_job:
                assert another_job
            async with elsewhere.checkpoints.only_one("backup") as another_store:
                assert another_store
        async with second.checkpoints.only_one("backup") as released:
            assert released


@both_stores
def test_a_job_is_held_by_one_store_at_a_time_and_refused_without_waiting(
    sims: Simulators, tmp_path: Path, database_url: str | None
) -> None:
    settings = retention_settings(sims, tmp_path / "data", database_url)
    if database_url is None:
        asyncio.run(holders_of(settings, retention_settings(sims, tmp_path / "other", None)))
        return
    with postgres_schema() as other:
        asyncio.run(holders_of(settings, retention_settings(sims, tmp_path / "other", schema_url(other))))


@both_stores
def test_the_sweep_skips_while_another_process_holds_it(
    sims: Simulators, tmp_path: Path, database_url: str | None
) -> None:
    settings = retention_settings(sims, tmp_path / "data", database_url)
    with running_app(settings) as app, ApiClient(app.url) as client:
        session_id = client.create_session()
        time.sleep(RETENTION_S + 0.3)

        async def sweep_while_held() -> SweepReport:
            async with open_stores(settings) as other, other.checkpoints.only_one("sweep") as held:
                assert held
                return await asyncio.to_thread(sweep, app)

        skipped = asyncio.run(sweep_while_held())
        assert (skipped.held_elsewhere, skipped.sessions) == (True, ()), skipped
        assert client.get_session(session_id).status_code == 200
        swept = sweep(app)
        assert (swept.held_elsewhere, [entry.fingerprint for entry in swept.sessions]) == (
            False,
            [fingerprint(session_id)],
        ), swept
        assert client.get_session(session_id).status_code == 404
