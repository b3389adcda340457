"""`python -m app.ops`: operations on the app's data, with the same APP_* settings as the
app (docs/data.md):

    backup              take a verified backup now
    backups             list the backups: time, size, checksum, verified or not
    verify FILE         check a backup whole
    restore FILE        put a backup in place of the data (the app stopped)
    sweep [--dry-run]   delete what is past its retention (or list it)
    re-embed            bring memories another embedder made into the current one's space

Exit status: 0 done; 1 failed (why, on standard error); 2 bad usage or configuration;
3 refused, as a process holds what it needs (a running app, another backup or sweep).
Nothing printed carries a session or audio id.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import httpx
import psycopg
from opentelemetry.trace import NoOpTracer
from prometheus_client import CollectorRegistry

from app.companion import Companion
from app.memory.embedding import EmbedderUnavailable
from app.memory.store import EmbedderMismatch, MemoryUnavailable
from app.metrics import AppMetrics
from app.outbound import Outbound, OutboundSettings
from app.outbound.telemetry import OutboundMetrics
from app.settings import AppSettings, load_settings
from app.storage import backup, data_dir, restore
from app.storage.backup import BackupError
from app.storage.backup_job import AnotherBackupRunning, back_up, upload_snapshot
from app.storage.data_dir import DataDirInUse
from app.storage.stores import open_stores
from app.wiring import open_companion, qdrant_server_client
from common.settings import ConfigurationError, load

DONE, FAILED, USAGE, REFUSED = 0, 1, 2, 3


def main(argv: Sequence[str] | None = None) -> int:
    data_dir.restrict_umask()
    arguments = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigurationError as error:
        print(f"app.ops: {error}", file=sys.stderr)
        return USAGE
    try:
        status: int = arguments.run(settings, arguments)
        return status
    except (DataDirInUse, AnotherBackupRunning) as error:
        print(f"app.ops: {error}", file=sys.stderr)
        return REFUSED
    except EmbedderUnavailable as error:
        print(f"app.ops: {error}", file=sys.stderr)
        return USAGE
    except BackupError as error:
        print(f"app.ops: {error}", file=sys.stderr)
        if error.detail:
            print(error.detail, file=sys.stderr)
        return FAILED
    except (OSError, psycopg.Error, httpx.HTTPError) as error:
        print(f"app.ops: {type(error).__name__}: {error}", file=sys.stderr)
        return FAILED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app.ops",
        description="Operations on the app's data, with the app's APP_* settings (docs/data.md).",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    command = commands.add_parser(
        "backup", help="take a verified backup now", description="Take a verified backup into APP_BACKUP_DIR now."
    )
    command.set_defaults(run=_backup)
    command = commands.add_parser(
        "backups", help="list the backups", description="List the backups in APP_BACKUP_DIR, newest first."
    )
    command.set_defaults(run=_backups)
    command = commands.add_parser(
        "verify",
        help="check a backup whole",
        description="Check a backup: its recorded checksum, each member's, and every database in it.",
    )
    command.add_argument("file", type=Path, metavar="FILE")
    command.set_defaults(run=_verify)
    command = commands.add_parser(
        "restore",
        help="put a backup in place of the data",
        description=(
            "Verify a backup and put it in place of the app's data, keeping what it replaces aside. "
            "Refused while the app runs on that data: stop it first, start it afterwards."
        ),
    )
    command.add_argument("file", type=Path, metavar="FILE")
    command.set_defaults(run=_restore)
    command = commands.add_parser(
        "sweep",
        help="delete what is past its retention",
        description=(
            "Delete sessions idle longer than APP_SESSION_RETENTION_DAYS (state, memories, audio) and reply "
            "audio older than APP_AUDIO_RETENTION_HOURS. With SQLite or the embedded Qdrant only while the "
            "app is stopped (it sweeps every hour by itself)."
        ),
    )
    command.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    command.set_defaults(run=_sweep)
    command = commands.add_parser(
        "re-embed",
        help="re-embed memories another embedder made",
        description=(
            "Re-embed, from their stored text, the memories made by an embedder other than APP_MEMORY_EMBEDDER's "
            "(the app does it at start-up too). With the embedded Qdrant only while the app is stopped."
        ),
    )
    command.set_defaults(run=_re_embed)
    return parser


def _backup(settings: AppSettings, arguments: argparse.Namespace) -> int:
    async def take() -> backup.Backup:
        async with open_stores(settings) as stores, _qdrant_server(settings) as qdrant:
            return await back_up(settings, stores.checkpoints, qdrant)

    made = asyncio.run(take())
    print(f"{made.path}\n  {_describe(made)}")
    return DONE


def _backups(settings: AppSettings, arguments: argparse.Namespace) -> int:
    found = backup.list_backups(settings.backups)
    if not found:
        print(f"no backups in {settings.backups}")
    for each in found:
        print(f"{each.path.name}  {_describe(each)}")
    return DONE


def _verify(settings: AppSettings, arguments: argparse.Namespace) -> int:
    manifest = backup.verify_backup(arguments.file)
    sessions = manifest["sessions"]
    print(
        f"{arguments.file}: sound - {manifest['store']}, taken {manifest['created_at']}"
        + (f", {sessions} sessions" if sessions is not None else "")
    )
    return DONE


def _restore(settings: AppSettings, arguments: argparse.Namespace) -> int:
    def upload(snapshot: Path) -> None:
        async def send() -> None:
            async with _qdrant_server(settings) as qdrant:
                assert qdrant is not None
                await upload_snapshot(qdrant, snapshot)

        asyncio.run(send())

    with_server = settings.feature_memory and settings.qdrant_url is not None
    done = restore.restore(settings, arguments.file, upload if with_server else None)
    print(
        f"restored {done.backup.name} (taken {done.created_at}); what it replaced is kept in {done.replaced}\n"
        "start the app to serve the restored data"
    )
    return DONE


def _sweep(settings: AppSettings, arguments: argparse.Namespace) -> int:
    async def run() -> int:
        async with _companion(settings) as companion:
            report = await companion.sweep(dry_run=arguments.dry_run)
        if report.held_elsewhere:
            print("app.ops: another process is sweeping now: nothing done", file=sys.stderr)
            return REFUSED
        verb = "would delete" if report.dry_run else "deleted"
        print(f"{verb} {len(report.sessions)} sessions and {report.audio} reply audio in {report.seconds:.3f} s")
        for session in report.sessions:
            print(f"  session {session.fingerprint}  idle since {session.idle_since}")
        return DONE

    with data_dir.claim(settings.data_dir) if settings.keeps_data_locally else contextlib.nullcontext():
        return asyncio.run(run())


def _re_embed(settings: AppSettings, arguments: argparse.Namespace) -> int:
    if not settings.feature_memory:
        print("app.ops: long-term memory is off (APP_FEATURE_MEMORY): nothing to re-embed", file=sys.stderr)
        return USAGE

    async def run() -> int:
        async with _companion(settings) as companion:
            memory = companion.services.memory
            assert memory is not None
            if memory.refusal is not None:
                print(f"app.ops: {memory.refusal}", file=sys.stderr)
                return FAILED
            try:
                count = await memory.re_embed()
            except (EmbedderMismatch, MemoryUnavailable) as error:
                print(f"app.ops: re-embedding failed: {error}", file=sys.stderr)
                return FAILED
        print(f"re-embedded {count} memories with {memory.embedder.name}")
        return DONE

    with data_dir.claim(settings.data_dir) if settings.keeps_data_locally else contextlib.nullcontext():
        return asyncio.run(run())


@contextlib.asynccontextmanager
async def _companion(settings: AppSettings) -> AsyncIterator[Companion]:
    """The app's companion, without telemetry: for what the command does through it."""
    metrics = AppMetrics.build(CollectorRegistry())
    opened = open_companion(
        settings, load(OutboundSettings), NoOpTracer(), metrics, OutboundMetrics.build(CollectorRegistry())
    )
    async with opened as (companion, _):
        yield companion


@contextlib.asynccontextmanager
async def _qdrant_server(settings: AppSettings) -> AsyncIterator[httpx.AsyncClient | None]:
    outbound = Outbound(load(OutboundSettings))
    client = qdrant_server_client(settings, outbound)
    try:
        yield client
    finally:
        if client is not None:
            await client.aclose()
        await outbound.aclose()


def _describe(made: backup.Backup) -> str:
    checksum = f"sha256 {made.sha256}" if made.sha256 else "not verified"
    when = made.created_at.isoformat(timespec="seconds")
    return f"{when}  {made.size:,} bytes  {checksum}"


if __name__ == "__main__":
    sys.exit(main())
