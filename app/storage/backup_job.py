"""The backup job: what the app runs every APP_BACKUP_INTERVAL_HOURS and
`python -m app.ops backup` runs on demand (docs/data.md#backups).

One process at a time across everything on the same store (`Checkpoints.only_one`); the
snapshot itself runs in a thread, so turns go on while it is taken (app/storage/backup.py
says why the result is consistent anyway). With a Qdrant server the collection's snapshot
is made by the server and downloaded (and, for a restore, uploaded) through the shared
outbound transport.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx

from app.memory.store import SHARED_COLLECTION
from app.metrics import AppMetrics
from app.settings import AppSettings
from app.storage import backup
from app.storage.backup import Backup, BackupError
from app.storage.conversations import Checkpoints

logger = logging.getLogger("app.storage")

JOB = "backup"
# The first backup of a process with none yet waits this long (or one interval, if that
# is shorter): a start-up is not slowed by it, and a crash loop does not fill the disk.
FIRST_DELAY_S = 60.0


class AnotherBackupRunning(Exception):
    pass


async def back_up(settings: AppSettings, checkpoints: Checkpoints, qdrant: httpx.AsyncClient | None) -> Backup:
    """A verified backup, now; `AnotherBackupRunning` if another process is taking one,
    `BackupError` if it failed. `qdrant`: the Qdrant server's client, when memories live there."""
    async with checkpoints.only_one(JOB) as ours:
        if not ours:
            raise AnotherBackupRunning("another process is taking a backup now")
        directory, keep = settings.backups, settings.backup_keep
        if settings.database_url is None:
            return await asyncio.to_thread(backup.back_up_embedded, settings.data_dir, directory, keep)
        snapshot = None
        if qdrant is not None:
            backup.secure_directory(directory)
            snapshot = directory / f".qdrant-{time.time_ns()}.snapshot"
            await _download_snapshot(qdrant, snapshot)
        try:
            return await asyncio.to_thread(backup.back_up_postgres, settings.database_url, directory, keep, snapshot)
        finally:
            if snapshot is not None:
                snapshot.unlink(missing_ok=True)


async def back_up_periodically(
    settings: AppSettings, checkpoints: Checkpoints, qdrant: httpx.AsyncClient | None, metrics: AppMetrics
) -> None:
    """Every APP_BACKUP_INTERVAL_HOURS from the newest verified backup there is: a restart
    does not put the next one off."""
    interval = settings.backup_interval_hours * 3600
    newest = backup.newest_verified(settings.backups)
    # With none yet, from now: an alert on its age measures how long this process went without.
    metrics.backup_last_success.set(newest.created_at.timestamp() if newest else time.time())
    if newest is not None:
        metrics.backup_bytes.set(newest.size)
    due = newest.created_at.timestamp() + interval if newest else 0.0
    await asyncio.sleep(max(due - time.time(), min(FIRST_DELAY_S, interval)))
    while True:
        started = time.monotonic()
        try:
            made = await back_up(settings, checkpoints, qdrant)
        except AnotherBackupRunning:
            metrics.backups.labels("skipped").inc()
            logger.info("backup skipped: another process is taking one")
        except BackupError as error:
            metrics.backups.labels("failed").inc()
            logger.error("backup failed: %s", error)
        except Exception as error:  # the schedule outlives a bad backup; the next one retries
            metrics.backups.labels("failed").inc()
            logger.error("backup failed: %s", type(error).__name__)
        else:
            metrics.backups.labels("ok").inc()
            metrics.backup_last_success.set(made.created_at.timestamp())
            metrics.backup_bytes.set(made.size)
            logger.info(
                "backup taken",
                extra={
                    "backup": made.path.name,
                    "bytes": made.size,
                    "sessions": made.sessions,
                    "duration_s": round(time.monotonic() - started, 3),
                },
            )
        await asyncio.sleep(interval)


SNAPSHOTS = f"/collections/{SHARED_COLLECTION}/snapshots"


async def upload_snapshot(qdrant: httpx.AsyncClient, snapshot: Path) -> None:
    """Qdrant's snapshot API: the collection recovered from `snapshot`, in place of what it held."""
    with snapshot.open("rb") as file:
        response = await qdrant.post(
            f"{SNAPSHOTS}/upload",
            params={"priority": "snapshot", "wait": "true"},
            files={"snapshot": (snapshot.name, file, "application/octet-stream")},
        )
    response.raise_for_status()


async def _download_snapshot(qdrant: httpx.AsyncClient, target: Path) -> None:
    """Qdrant's snapshot API: create one of the collection, download it, delete it there."""
    snapshots = SNAPSHOTS
    created = await qdrant.post(snapshots, params={"wait": "true"})
    created.raise_for_status()
    name = created.json()["result"]["name"]
    try:
        async with qdrant.stream("GET", f"{snapshots}/{name}") as response:
            response.raise_for_status()
            with backup.new_file(target) as out:
                async for chunk in response.aiter_bytes():
                    out.write(chunk)
    finally:
        await qdrant.delete(f"{snapshots}/{name}")
