"""Restoring a backup, and the start-up integrity check (docs/data.md#restoring).

Embedded stores: refused while an app process holds the data directory
(`data_dir.claim`), which the restore then holds itself, so that no app starts meanwhile.
The backup is verified whole and unpacked inside the data directory; what it replaces -
the conversation database with its -wal and -shm files, the embedded Qdrant - goes into
`replaced-<time>/` there; the restored files are renamed into place. The database is
replaced by one rename, so at every moment `conversations.db` is the old one or the
restored one, never a mix. Reply audio is left as it is.

PostgreSQL: refused while an app is connected to the database (its connections are named
`voice-companion-app`). What it replaces is first backed up into APP_BACKUP_DIR like any
other backup, then `pg_restore --clean --if-exists --single-transaction` loads the dump and
a Qdrant server is given the memories' snapshot.

At start-up, `check_at_start` runs SQLite's quick check on the conversation database: a
corrupt one stops the app with the newest verified backup and the command that restores it,
or, with APP_RESTORE_ON_CORRUPTION, is restored from that backup.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from app.settings import AppSettings
from app.storage import backup
from app.storage.backup import Backup, BackupError
from app.storage.data_dir import DIRECTORY_MODE, claim
from app.storage.stores import APPLICATION_NAME

logger = logging.getLogger("app.storage")

SIDE_FILES = ("-wal", "-shm", "-journal")
CONNECTED_APPS = (
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE datname = current_database() AND application_name = %s AND pid <> pg_backend_pid()"
)


class CorruptDatabase(Exception):
    """The conversation database failed its check at start-up, and was not restored."""


@dataclass(frozen=True)
class Restored:
    backup: Path
    created_at: str
    sessions: int | None
    replaced: Path  # where what was there before is kept


def restore(settings: AppSettings, path: Path, upload_snapshot: Callable[[Path], None] | None = None) -> Restored:
    """Puts the backup at `path` in place of the app's data; `BackupError`,
    `DataDirInUse` or `psycopg.Error` say why not. `upload_snapshot` gives a Qdrant
    server the memories' snapshot, when the backup has one and memories live there."""
    if settings.database_url is not None:
        return _restore_postgres(settings, path, upload_snapshot)
    with claim(settings.data_dir):
        return _restore_embedded(settings.data_dir, path)


def check_at_start(settings: AppSettings) -> Restored | None:
    """Called by `python -m app` holding the data directory: nothing when the conversation
    database is sound (or absent, or in PostgreSQL); what was restored, with
    APP_RESTORE_ON_CORRUPTION; `CorruptDatabase` otherwise."""
    database = backup.conversations_path(settings.data_dir)
    if settings.database_url is not None or not database.is_file():
        return None
    problem = backup.integrity_problem(database)
    if problem is None:
        return None
    newest = backup.newest_verified(settings.backups)
    if newest is None:
        raise CorruptDatabase(
            f"{database} fails SQLite's quick check ({problem}) and there is no verified backup in "
            f"{settings.backups} to restore: move the file aside to start with an empty database"
        )
    if not settings.restore_on_corruption:
        raise CorruptDatabase(
            f"{database} fails SQLite's quick check ({problem}). The newest verified backup is "
            f"{newest.path} ({newest.created_at.isoformat()}); restore it with "
            f"`python -m app.ops restore {newest.path}`, or start with APP_RESTORE_ON_CORRUPTION=true"
        )
    restored = _restore_embedded(settings.data_dir, newest.path)
    logger.warning(
        "the conversation database failed its quick check and was restored from the newest verified backup",
        extra={"backup": newest.path.name, "backup_time": restored.created_at, "replaced": str(restored.replaced)},
    )
    return restored


def _restore_embedded(data_dir: Path, path: Path) -> Restored:
    staging = Path(tempfile.mkdtemp(dir=data_dir, prefix=".restore-"))
    try:
        manifest = backup.verify_backup(path, into=staging)
        if manifest["store"] != "sqlite":
            raise BackupError(f"{path.name} is a backup of PostgreSQL, and this app keeps its data in SQLite")
        aside = _aside(data_dir)
        database = backup.conversations_path(data_dir)
        for suffix in SIDE_FILES:  # a log of the old database must not be applied to the new one
            side = database.with_name(database.name + suffix)
            if side.exists():
                os.replace(side, aside / side.name)
        if database.exists():
            os.link(database, aside / database.name)
        os.replace(staging / backup.CONVERSATIONS, database)
        qdrant = backup.qdrant_path(data_dir)
        if qdrant.exists():
            os.replace(qdrant, aside / backup.QDRANT)
        if (staging / backup.QDRANT).exists():
            os.replace(staging / backup.QDRANT, qdrant)
        backup.sync_directory(data_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Restored(path, manifest["created_at"], manifest["sessions"], aside)


def _restore_postgres(settings: AppSettings, path: Path, upload_snapshot: Callable[[Path], None] | None) -> Restored:
    assert settings.database_url is not None
    with tempfile.TemporaryDirectory(dir=settings.backups if settings.backups.is_dir() else None) as unpacked:
        manifest = backup.verify_backup(path, into=Path(unpacked))
        if manifest["store"] != "postgres":
            raise BackupError(f"{path.name} is a backup of SQLite, and this app keeps its data in PostgreSQL")
        with psycopg.connect(settings.database_url, autocommit=True) as connection:
            row = connection.execute(CONNECTED_APPS, (APPLICATION_NAME,)).fetchone()
        if row is not None and row[0]:
            raise BackupError(f"{row[0]} connection(s) of a running app are open on the database: stop the app first")
        aside: Backup = backup.back_up_postgres(settings.database_url, settings.backups, settings.backup_keep + 1, None)
        conninfo, environment = backup.libpq(settings.database_url)
        backup.run_command(
            [
                "pg_restore",
                "--clean",
                "--if-exists",
                "--no-owner",
                "--single-transaction",
                f"--dbname={conninfo}",
                str(Path(unpacked) / backup.DUMP),
            ],
            environment,
        )
        snapshot = Path(unpacked) / backup.QDRANT_SNAPSHOT
        if snapshot.exists() and upload_snapshot is not None:
            upload_snapshot(snapshot)
        elif snapshot.exists():
            logger.warning("the backup's memories were not restored: no Qdrant server is configured (APP_QDRANT_URL)")
    return Restored(path, manifest["created_at"], manifest["sessions"], aside.path)


def _aside(data_dir: Path) -> Path:
    stamp = datetime.now(UTC).strftime(backup.STAMP)
    aside = data_dir / f"replaced-{stamp}"
    with contextlib.suppress(FileExistsError):
        aside.mkdir(mode=DIRECTORY_MODE)
        return aside
    return Path(tempfile.mkdtemp(dir=data_dir, prefix=f"replaced-{stamp}-"))
