"""Conversation state in a LangGraph checkpointer: SQLite under `APP_DATA_DIR` by default,
PostgreSQL when `APP_DATABASE_URL` is set, so several app replicas share sessions: one
class for each behind the `Checkpoints` protocol (opened by `app.storage.stores`).

`hold` serialises the turns of a thread across processes: SQLite is one app process's
(the in-process lock is all it needs), PostgreSQL takes the session's advisory lock
(`app.storage.session_lock`).

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

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Protocol

import aiosqlite
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
from psycopg import AsyncConnection
from psycopg.rows import DictRow
from psycopg_pool import AsyncConnectionPool

from app.storage.session_lock import session_lock

logger = logging.getLogger("app.storage")

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

    def hold(self, thread_id: str, deadline: float) -> AbstractAsyncContextManager[None]:
        """The thread to this process alone while entered, across every process on the
        database; `TimeoutError` if it cannot be had by `deadline` (the event loop's time)."""


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

    @asynccontextmanager
    async def hold(self, thread_id: str, deadline: float) -> AsyncIterator[None]:
        yield  # one app process per SQLite database: its in-process lock is the only one


class PostgresCheckpoints:
    """At `APP_DATABASE_URL`, shared by the replicas; the session locks on a pool of their own."""

    def __init__(
        self,
        saver: AsyncPostgresSaver,
        pool: AsyncConnectionPool[AsyncConnection[DictRow]],
        lock_pool: AsyncConnectionPool[AsyncConnection],
    ) -> None:
        self.saver = saver
        self._pool = pool
        self._lock_pool = lock_pool

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

    def hold(self, thread_id: str, deadline: float) -> AbstractAsyncContextManager[None]:
        return session_lock(self._lock_pool, thread_id, deadline)


@asynccontextmanager
async def open_sqlite_checkpoints(data_dir: Path) -> AsyncIterator[SqliteCheckpoints]:
    """In `data_dir`, which exists (`app.storage.data_dir.secure`)."""
    async with AsyncSqliteSaver.from_conn_string(str(data_dir / "conversations.db")) as saver:
        # A connection setting: deleted content is zeroed in place, not left in free space.
        await saver.conn.execute("PRAGMA secure_delete=ON")
        await saver.setup()
        yield SqliteCheckpoints(saver)
