"""Conversation state in a LangGraph checkpointer: SQLite under `APP_DATA_DIR` by default,
PostgreSQL when `APP_DATABASE_URL` is set, so several app replicas share sessions: one
class for each behind the `Checkpoints` protocol (opened by `app.storage.stores`).

`hold` serialises the turns of a thread across processes: SQLite is one app process's
(the in-process lock is all it needs), PostgreSQL takes the session's advisory lock
(`app.storage.session_lock`). `only_one` lets one process of all those on the store run
a job (the retention sweep) and tells the others so, without waiting: an advisory lock
on PostgreSQL, a `flock` on a file of the data directory with SQLite.

One thread per session. After each turn only the latest checkpoint of the thread is kept
(and its pending writes): the history of checkpoints is never read, and keeping it grew
the database by a full copy of the conversation per turn.

Checkpoint ids are LangGraph's uuid6, which begin with the time they were made at, so
that their text sorts by time; the newest of a thread is written at its creation and at
the end of every turn. When a thread was last written is read from that id, and the
threads idle since before a time are found on the primary key (thread, namespace, id)
alone, no state loaded (measured in docs/benchmarks.md#retention-sweep).

Deleting a thread leaves none of its words in the SQLite files once `delete` returns: the
connection runs with `secure_delete` (deleted rows and freed pages are overwritten with
zeros, not just marked free), and the write-ahead log, which still holds the pages as
they were before, is checkpointed into the database and truncated to nothing. PostgreSQL
keeps deleted rows as dead tuples until VACUUM; docs/app.md says what remains where.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Protocol

import aiosqlite
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.base.id import UUID
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
CHECK = "SELECT 1 FROM checkpoints LIMIT 1"
# A walk of the primary key's index in thread order, each thread's newest root checkpoint
# id its last entry: no row read, no state decoded.
IDLE_SQLITE = """
SELECT thread_id, max(checkpoint_id) AS newest FROM checkpoints
WHERE checkpoint_ns = '' AND thread_id > ?
GROUP BY thread_id HAVING max(checkpoint_id) < ?
ORDER BY thread_id LIMIT ?"""
IDLE_POSTGRES = IDLE_SQLITE.replace("?", "%s")
NEWEST_SQLITE = "SELECT max(checkpoint_id) AS newest FROM checkpoints WHERE thread_id = ? AND checkpoint_ns = ''"
NEWEST_POSTGRES = NEWEST_SQLITE.replace("?", "%s")
# Where the tables are: an advisory lock is the whole database's, and one database may
# hold several deployments' tables, one schema each (the tests' do).
STORE = "SELECT current_schema() AS store"
TRY_LOCK = "SELECT pg_try_advisory_lock(%s) AS held"
UNLOCK = "SELECT pg_advisory_unlock(%s)"
# 100-nanosecond intervals from the UUID epoch (1582-10-15) to the Unix epoch.
UUID_EPOCH = 0x01B21DD213814000


class Checkpoints(Protocol):
    """The checkpointer, plus the few things LangGraph's interface does not offer."""

    @property
    def saver(self) -> BaseCheckpointSaver[str]: ...

    async def delete(self, thread_id: str) -> None:
        """Deletes the thread's checkpoints and writes."""

    async def keep_latest(self, thread_id: str) -> None:
        """Deletes every checkpoint of the thread but the latest, and their writes."""

    async def idle_threads(self, cutoff: float, after: str, limit: int) -> list[tuple[str, float]]:
        """Threads whose newest root checkpoint was written before `cutoff` (epoch
        seconds), with when: at most `limit`, in thread order, from the first after `after`
        (so that a caller pages through them, deleting or not)."""

    async def written_at(self, thread_id: str) -> float | None:
        """When the thread's newest root checkpoint was written (epoch seconds); None without one."""

    async def check(self) -> bool:
        """A real query on the database, for readiness."""

    def hold(self, thread_id: str, deadline: float) -> AbstractAsyncContextManager[None]:
        """The thread to this process alone while entered, across every process on the
        database; `TimeoutError` if it cannot be had by `deadline` (the event loop's time)."""

    def only_one(self, job: str) -> AbstractAsyncContextManager[bool]:
        """True while entered if this process holds `job` across every process on the
        store, False if another does (never waits); released on leaving."""


class SqliteCheckpoints:
    """Under `APP_DATA_DIR`; a deletion leaves no copy of the thread in the files."""

    def __init__(self, saver: AsyncSqliteSaver, data_dir: Path) -> None:
        self.saver = saver
        self._connection: aiosqlite.Connection = saver.conn
        self._data_dir = data_dir

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
        # AsyncSqliteSaver does not implement pruning; checkpoint ids are time-ordered. Under
        # the saver's lock: the connection is shared, and a commit here that fails (a full
        # disk) would otherwise roll back another turn's save half done.
        async with self.saver.lock:
            await self._connection.execute(PRUNE_SQLITE_WRITES, (thread_id, thread_id))
            await self._connection.execute(PRUNE_SQLITE_CHECKPOINTS, (thread_id, thread_id))
            await self._connection.commit()

    async def idle_threads(self, cutoff: float, after: str, limit: int) -> list[tuple[str, float]]:
        # Read to the end, so that no statement is left open holding a snapshot.
        async with self._connection.execute(IDLE_SQLITE, (after, checkpoint_id_at(cutoff), limit)) as cursor:
            rows = await cursor.fetchall()
        return [(str(thread_id), written_when(str(newest))) for thread_id, newest in rows]

    async def written_at(self, thread_id: str) -> float | None:
        async with self._connection.execute(NEWEST_SQLITE, (thread_id,)) as cursor:
            row = await cursor.fetchone()
        return None if row is None or row[0] is None else written_when(str(row[0]))

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

    @asynccontextmanager
    async def only_one(self, job: str) -> AsyncIterator[bool]:
        # Another process on the data directory (`python -m app.ops`) sees the same file.
        descriptor = os.open(self._data_dir / f"{job}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except BlockingIOError:
                held = False
            yield held
        finally:
            os.close(descriptor)  # which releases the lock


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

    async def idle_threads(self, cutoff: float, after: str, limit: int) -> list[tuple[str, float]]:
        async with self._pool.connection() as connection:
            rows = await (await connection.execute(IDLE_POSTGRES, (after, checkpoint_id_at(cutoff), limit))).fetchall()
        return [(str(row["thread_id"]), written_when(str(row["newest"]))) for row in rows]

    async def written_at(self, thread_id: str) -> float | None:
        async with self._pool.connection() as connection:
            row = await (await connection.execute(NEWEST_POSTGRES, (thread_id,))).fetchone()
        return None if row is None or row["newest"] is None else written_when(str(row["newest"]))

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
    async def only_one(self, job: str) -> AsyncIterator[bool]:
        # Advisory locks belong to the connection's session: it is held until the job ends.
        async with self._lock_pool.connection() as connection:
            store = await (await connection.execute(STORE)).fetchone()
            key = job_key(str(store[0]) if store else "", job)
            row = await (await connection.execute(TRY_LOCK, (key,))).fetchone()
            if row is None or not row[0]:
                yield False
                return
            try:
                yield True
            finally:
                try:
                    await connection.execute(UNLOCK, (key,))
                except BaseException:
                    await connection.close()  # the server releases the lock with the session
                    raise


@asynccontextmanager
async def open_sqlite_checkpoints(data_dir: Path) -> AsyncIterator[SqliteCheckpoints]:
    """In `data_dir`, which exists (`app.storage.data_dir.secure`)."""
    async with AsyncSqliteSaver.from_conn_string(str(data_dir / "conversations.db")) as saver:
        # A connection setting: deleted content is zeroed in place, not left in free space.
        await saver.conn.execute("PRAGMA secure_delete=ON")
        await saver.setup()
        yield SqliteCheckpoints(saver, data_dir)


def checkpoint_id_at(epoch: float) -> str:
    """The least checkpoint id LangGraph could make at `epoch` (seconds): every id made
    before sorts below it as text, every id made at or after it above."""
    timestamp = round(epoch * 10_000_000) + UUID_EPOCH
    return str(UUID(int=(timestamp >> 12) << 80 | (timestamp & 0x0FFF) << 64, version=6))


def written_when(checkpoint_id: str) -> float:
    """When LangGraph made the checkpoint id (epoch seconds)."""
    return (UUID(checkpoint_id).time - UUID_EPOCH) / 10_000_000


def job_key(store: str, job: str) -> int:
    """The advisory lock of `job` on the tables in schema `store`: a signed 64-bit key,
    apart from the sessions' (another BLAKE2b person)."""
    digest = hashlib.blake2b(f"{store}:{job}".encode(), digest_size=8, person=b"only-one-job").digest()
    return int.from_bytes(digest, "big", signed=True)
