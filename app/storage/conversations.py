"""Conversation state in a LangGraph checkpointer: SQLite under `APP_DATA_DIR` by default,
PostgreSQL when `APP_DATABASE_URL` is set, so several app replicas share sessions: one
class for each behind the `Checkpoints` protocol.

One thread per session. After each turn only the latest checkpoint of the thread is kept
(and its pending writes): the history of checkpoints is never read, and keeping it grew
the database by a full copy of the conversation per turn.

Deleting a thread leaves none of its words in the SQLite files once `delete` returns: the
connection runs with `secure_delete` (deleted rows and freed pages are overwritten with
zeros, not just marked free), and the write-ahead log, which still holds the pages as
they were before, is checkpointed into the database and truncated to nothing. PostgreSQL
keeps deleted rows as dead tuples until VACUUM; docs/app.md says what remains where.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

import aiosqlite
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from psycopg import AsyncConnection
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from app.settings import AppSettings

logger = logging.getLogger("app.storage")

# Any fixed number: the advisory lock under which the checkpoint tables are set up.
SETUP_LOCK = 7_405_112_317
TRY_SETUP_LOCK = "SELECT pg_try_advisory_lock(%s) AS acquired"

# AsyncSqliteSaver does not implement pruning; checkpoint ids are time-ordered.
PRUNE_SQLITE_WRITES = """
DELETE FROM writes WHERE thread_id = ? AND checkpoint_id <> (
    SELECT max(checkpoint_id) FROM checkpoints WHERE thread_id = ? AND checkpoint_ns = ''
)"""
PRUNE_SQLITE_CHECKPOINTS = """
DELETE FROM checkpoints WHERE thread_id = ? AND checkpoint_id <> (
    SELECT max(checkpoint_id) FROM checkpoints WHERE thread_id = ? AND checkpoint_ns = ''
)"""
# Copies every page in the log into the database, then truncates the log to zero bytes.
CHECKPOINT_WAL = "PRAGMA wal_checkpoint(TRUNCATE)"
THREAD_IDS = "SELECT DISTINCT thread_id FROM checkpoints"
CHECK = "SELECT 1 FROM checkpoints LIMIT 1"


class Checkpoints(Protocol):
    """The checkpointer, plus the few things LangGraph's interface does not offer."""

    @property
    def saver(self) -> BaseCheckpointSaver[str]: ...

    async def delete(self, thread_id: str) -> None:
        """Deletes the thread's checkpoints and writes."""

    async def keep_latest(self, thread_id: str) -> None:
        """Deletes every checkpoint of the thread but the latest, and their writes."""

    async def thread_ids(self) -> list[str]: ...

    async def check(self) -> bool:
        """A real query on the database, for readiness."""


class SqliteCheckpoints:
    """Under `APP_DATA_DIR`; a deletion leaves no copy of the thread in the files."""

    def __init__(self, saver: AsyncSqliteSaver) -> None:
        self.saver = saver
        self._connection: aiosqlite.Connection = saver.conn

    async def delete(self, thread_id: str) -> None:
        await self.saver.adelete_thread(thread_id)
        # Under the saver's lock: a statement of its own still running would keep its
        # snapshot of the log, and the log could not be truncated.
        async with self.saver.lock, self._connection.execute(CHECKPOINT_WAL) as cursor:
            row = await cursor.fetchone()
        if row is None or row[0] != 0:
            logger.warning(
                "the write-ahead log could not be truncated after a deletion: "
                "deleted words stay in it until the next deletion truncates it"
            )

    async def keep_latest(self, thread_id: str) -> None:
        # AsyncSqliteSaver does not implement pruning; checkpoint ids are time-ordered.
        await self._connection.execute(PRUNE_SQLITE_WRITES, (thread_id, thread_id))
        await self._connection.execute(PRUNE_SQLITE_CHECKPOINTS, (thread_id, thread_id))
        await self._connection.commit()

    async def thread_ids(self) -> list[str]:
        async with self._connection.execute(THREAD_IDS) as cursor:
            return [str(row[0]) async for row in cursor]

    async def check(self) -> bool:
        try:
            # Read to the end, so that no statement is left open holding a snapshot.
            async with self._connection.execute(CHECK) as cursor:
                await cursor.fetchall()
        except Exception:  # any driver error means "not usable now"
            return False
        return True


class PostgresCheckpoints:
    """At `APP_DATABASE_URL`, shared by the replicas."""

    def __init__(self, saver: AsyncPostgresSaver, pool: AsyncConnectionPool[AsyncConnection[DictRow]]) -> None:
        self.saver = saver
        self._pool = pool

    async def delete(self, thread_id: str) -> None:
        await self.saver.adelete_thread(thread_id)

    async def keep_latest(self, thread_id: str) -> None:
        await self.saver.aprune([thread_id], strategy="keep_latest")

    async def thread_ids(self) -> list[str]:
        async with self._pool.connection() as connection:
            rows = await (await connection.execute(THREAD_IDS)).fetchall()
        return [str(row["thread_id"]) for row in rows]

    async def check(self) -> bool:
        try:
            async with self._pool.connection() as connection:
                await connection.execute(CHECK)
        except Exception:  # any driver error means "not usable now"
            return False
        return True


@asynccontextmanager
async def open_checkpoints(settings: AppSettings) -> AsyncIterator[Checkpoints]:
    if settings.database_url is not None:
        pool: AsyncConnectionPool[AsyncConnection[DictRow]] = AsyncConnectionPool(
            settings.database_url,
            min_size=1,
            max_size=10,
            open=False,
            # What LangGraph's Postgres saver needs of its connections.
            kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
        )
        try:
            await pool.open(wait=True, timeout=10)
        except PoolTimeout:
            logger.error("the database at APP_DATABASE_URL cannot be reached")
            raise
        try:
            postgres_saver = AsyncPostgresSaver(pool)
            async with pool.connection() as lock:
                await _take_setup_lock(lock)
                try:
                    await postgres_saver.setup()
                finally:
                    await lock.execute("SELECT pg_advisory_unlock(%s)", (SETUP_LOCK,))
            yield PostgresCheckpoints(postgres_saver, pool)
        finally:
            await pool.close()
    else:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        async with AsyncSqliteSaver.from_conn_string(str(settings.data_dir / "conversations.db")) as sqlite_saver:
            # A connection setting: deleted content is zeroed in place, not left in free space.
            await sqlite_saver.conn.execute("PRAGMA secure_delete=ON")
            await sqlite_saver.setup()
            yield SqliteCheckpoints(sqlite_saver)


async def _take_setup_lock(connection: AsyncConnection[DictRow]) -> None:
    """Replicas starting together on a fresh database would each create the tables and
    collide; one at a time, the later ones find them made. The lock is polled, not waited
    for: a statement waiting for it would hold a snapshot that the set-up's
    CREATE INDEX CONCURRENTLY then waits for, forever."""
    while True:
        row = await (await connection.execute(TRY_SETUP_LOCK, (SETUP_LOCK,))).fetchone()
        if row is not None and row["acquired"]:
            return
        await asyncio.sleep(0.2)
