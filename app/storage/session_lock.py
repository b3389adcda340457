"""One turn of a session at a time across every app replica on one PostgreSQL database:
a session-level advisory lock, keyed by a 64-bit hash of the session id, held on a
connection of its own for as long as the turn runs (docs/app.md#several-replicas).

The connections come from a pool of their own, so that turns holding their locks can
never take every connection the checkpointer needs and stall each other. Waiting is
bounded by the server (`lock_timeout`): `TimeoutError` when the lock or a connection
cannot be had by the caller's deadline. The lock is released when the turn ends, and by
the server when its connection is lost; a connection that may still hold a lock the app
could not release is closed rather than pooled.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from psycopg import AsyncConnection, errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

# Turns per replica that can hold their session's lock at once: as many as the Groq
# bulkhead lets reply at once (docs/resilience.md#the-policies).
LOCK_CONNECTIONS = 32

SET_LOCK_TIMEOUT = "SELECT set_config('lock_timeout', %s, false)"
RESET_LOCK_TIMEOUT = "RESET lock_timeout"
LOCK = "SELECT pg_advisory_lock(%s)"
UNLOCK = "SELECT pg_advisory_unlock(%s)"


def lock_key(session_id: str) -> int:
    """The session's advisory lock: PostgreSQL's keys are signed 64-bit integers."""
    digest = hashlib.blake2b(session_id.encode(), digest_size=8, person=b"session-turns").digest()
    return int.from_bytes(digest, "big", signed=True)


def lock_pool(database_url: str, application_name: str) -> AsyncConnectionPool[AsyncConnection]:
    """Opened by the caller; connections are made as turns need them."""
    return AsyncConnectionPool(
        database_url,
        min_size=0,
        max_size=LOCK_CONNECTIONS,
        open=False,
        kwargs={"autocommit": True, "application_name": application_name},
    )


@asynccontextmanager
async def session_lock(
    pool: AsyncConnectionPool[AsyncConnection], session_id: str, deadline: float
) -> AsyncIterator[None]:
    """Holds the session's lock; `deadline` is the event loop's time by which it must be had."""
    key = lock_key(session_id)
    try:
        async with pool.connection(timeout=_left(deadline)) as connection:
            await _lock(connection, key, deadline)
            try:
                yield
            finally:
                await _unlock(connection, key)
    except PoolTimeout:
        raise TimeoutError from None


async def _lock(connection: AsyncConnection, key: int, deadline: float) -> None:
    # At least a millisecond: a lock_timeout of 0 would wait for ever.
    timeout = f"{max(1, round(_left(deadline) * 1000))}ms"
    try:
        await connection.execute(SET_LOCK_TIMEOUT, (timeout,))
        try:
            await connection.execute(LOCK, (key,))
        finally:
            await connection.execute(RESET_LOCK_TIMEOUT)
    except errors.LockNotAvailable:
        raise TimeoutError from None
    except BaseException:
        # Cut off mid-statement (cancelled, or the connection failed): the lock may have
        # been granted all the same; only the end of the session surely releases it.
        await connection.close()
        raise


async def _unlock(connection: AsyncConnection, key: int) -> None:
    try:
        await connection.execute(UNLOCK, (key,))
    except BaseException:
        await connection.close()  # the server releases the lock with the session
        raise


def _left(deadline: float) -> float:
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        raise TimeoutError
    return left
