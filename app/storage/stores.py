"""Which stores the app keeps its conversations and reply audio in, decided in one place:

- `APP_DATABASE_URL` unset: SQLite checkpoints and audio files under `APP_DATA_DIR`, for
  one app process;
- set: both in that PostgreSQL database, with the turns' session locks, so that any
  replica can serve any request of any session (docs/app.md#several-replicas).

Replicas starting together on a fresh database would each create the tables and
collide: the set-up runs under an advisory lock, one replica at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from psycopg import AsyncConnection
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from app.settings import AppSettings
from app.storage.audio import AudioFiles, AudioStore, PostgresAudio, create_audio_table
from app.storage.conversations import Checkpoints, PostgresCheckpoints, open_sqlite_checkpoints
from app.storage.session_lock import lock_pool

logger = logging.getLogger("app.storage")

# Any fixed number: the advisory lock under which the tables are set up.
SETUP_LOCK = 7_405_112_317
TRY_SETUP_LOCK = "SELECT pg_try_advisory_lock(%s) AS acquired"
OPEN_TIMEOUT_S = 10.0
# On every connection of the app's: a restore refuses while one is open (app/storage/restore.py).
APPLICATION_NAME = "voice-companion-app"


@dataclass(frozen=True)
class Stores:
    checkpoints: Checkpoints
    audio: AudioStore


@asynccontextmanager
async def open_stores(settings: AppSettings) -> AsyncIterator[Stores]:
    if settings.database_url is None:
        audio = AudioFiles(settings.data_dir / "audio")
        audio.setup()
        async with open_sqlite_checkpoints(settings.data_dir) as checkpoints:
            yield Stores(checkpoints, audio)
        return
    pool: AsyncConnectionPool[AsyncConnection[DictRow]] = AsyncConnectionPool(
        settings.database_url,
        min_size=1,
        max_size=10,
        open=False,
        # What LangGraph's Postgres saver needs of its connections.
        kwargs={
            "autocommit": True,
            "prepare_threshold": 0,
            "row_factory": dict_row,
            "application_name": APPLICATION_NAME,
        },
    )
    locks = lock_pool(settings.database_url, APPLICATION_NAME)
    try:
        try:
            await pool.open(wait=True, timeout=OPEN_TIMEOUT_S)
        except PoolTimeout:
            logger.error("the database at APP_DATABASE_URL cannot be reached")
            raise
        await locks.open()
        saver = AsyncPostgresSaver(pool)
        async with pool.connection() as connection:
            await _take_setup_lock(connection)
            try:
                await saver.setup()
                await create_audio_table(connection)
            finally:
                await connection.execute("SELECT pg_advisory_unlock(%s)", (SETUP_LOCK,))
        yield Stores(PostgresCheckpoints(saver, pool, locks), PostgresAudio(pool))
    finally:
        await locks.close()
        await pool.close()


async def _take_setup_lock(connection: AsyncConnection[DictRow]) -> None:
    """Polled, not waited for: a statement waiting for it would hold a snapshot that the
    set-up's CREATE INDEX CONCURRENTLY then waits for, forever."""
    while True:
        row = await (await connection.execute(TRY_SETUP_LOCK, (SETUP_LOCK,))).fetchone()
        if row is not None and row["acquired"]:
            return
        await asyncio.sleep(0.2)
