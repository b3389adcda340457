"""Whether a failure is a full disk: the data directory's filesystem, or the PostgreSQL
database's, with no room left for a write. Such a turn, session or deletion is answered
507 `storage_full` instead of as a failure of the app (docs/app.md#when-the-disk-is-full).

What each store raises then:

- SQLite: `SQLITE_FULL` ("database or disk is full"), which it also reports for a write to
  its write-ahead log that the filesystem refused (ENOSPC); the transaction is rolled back;
- files (reply audio): `OSError` with ENOSPC, or EDQUOT when a quota is what is full;
- PostgreSQL: SQLSTATE 53100 `disk_full` ("could not extend file ...").

The embedded Qdrant's failures never get here: the memory store turns every one into
`MemoryUnavailable`, which only degrades a turn.
"""

from __future__ import annotations

import errno
import sqlite3

import psycopg

NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
POSTGRES_DISK_FULL = "53100"


def storage_full(error: BaseException) -> bool:
    if isinstance(error, sqlite3.Error):
        # Extended result codes keep the primary code in their low byte; an error that did
        # not come from SQLite itself has none.
        code = getattr(error, "sqlite_errorcode", None)
        return code is not None and code & 0xFF == sqlite3.SQLITE_FULL
    if isinstance(error, psycopg.Error):
        return error.sqlstate == POSTGRES_DISK_FULL
    return isinstance(error, OSError) and error.errno in NO_ROOM_ERRNOS
