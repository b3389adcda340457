"""Backups: consistent online snapshots of what the app keeps, one verified file each
(docs/data.md#backups).

A backup is a gzipped tar named `backup-<UTC time>-<random>.tar.gz` in APP_BACKUP_DIR:
`manifest.json` (format, time, store, session count, every other member's SHA-256), then

- embedded stores: `conversations.db`, made by SQLite's online backup API (a consistent
  snapshot while the app writes, never a file copy), and `qdrant/` - the embedded Qdrant's
  `meta.json` and each session's collection, its SQLite file by the same API. The
  conversations are taken first, then the memory collections of the sessions in that
  snapshot only: a turn writes its memory before its state, so every turn in the backup has
  its memories, and no memory in it outlives its session;
- PostgreSQL: `conversations.pgdump` (`pg_dump`'s custom format) and, with a Qdrant server,
  `qdrant/memories.snapshot` (the collection's snapshot, by Qdrant's snapshot API).

Each one is written under a temporary name, verified (every member's checksum, SQLite's
integrity check of every database in it, `pg_restore --list` of a dump), renamed into place,
and its own checksum written beside it in `sha256sum`'s format (`<name>.sha256`): a backup
with that file was verified. The newest APP_BACKUP_KEEP verified ones are kept. Reply audio
is not backed up: it lives for APP_AUDIO_RETENTION_HOURS only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from app.storage.data_dir import DIRECTORY_MODE, FILE_MODE

FORMAT = 1
MANIFEST = "manifest.json"
CONVERSATIONS = "conversations.db"
DUMP = "conversations.pgdump"
QDRANT = "qdrant"
QDRANT_META = "meta.json"
QDRANT_SNAPSHOT = "qdrant/memories.snapshot"
COLLECTION_PREFIX = "memories-"
STORAGE_FILE = "storage.sqlite"  # qdrant-client's embedded storage, one per collection
NAME = re.compile(r"^backup-(\d{8}T\d{6}Z)-[0-9a-f]{6}\.tar\.gz$")
STAMP = "%Y%m%dT%H%M%SZ"
CHUNK = 1 << 20


class BackupError(Exception):
    """What went wrong, in words fit for a log line (no ids, no data, no addresses); `detail`
    is what a command said, for the operator's terminal only."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


@dataclass(frozen=True)
class Backup:
    path: Path
    created_at: datetime
    size: int
    sha256: str | None  # recorded once verified
    sessions: int | None = None

    @property
    def verified(self) -> bool:
        return self.sha256 is not None


def conversations_path(data_dir: Path) -> Path:
    return data_dir / CONVERSATIONS


def qdrant_path(data_dir: Path) -> Path:
    return data_dir / QDRANT


def list_backups(directory: Path) -> list[Backup]:
    """The backups in `directory`, newest first; unfinished ones (no final name) are not."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = NAME.match(path.name)
        if match is None or not path.is_file():
            continue
        created = datetime.strptime(match.group(1), STAMP).replace(tzinfo=UTC)
        found.append(Backup(path, created, path.stat().st_size, _recorded_checksum(path)))
    return sorted(found, key=lambda backup: backup.path.name, reverse=True)


def newest_verified(directory: Path) -> Backup | None:
    return next((backup for backup in list_backups(directory) if backup.verified), None)


def back_up_embedded(data_dir: Path, directory: Path, keep: int) -> Backup:
    """The SQLite database and the embedded Qdrant under `data_dir`, into `directory`."""
    with _staging(directory) as staging:
        _snapshot_sqlite(conversations_path(data_dir), staging / CONVERSATIONS)
        sessions = _session_ids(staging / CONVERSATIONS)
        _snapshot_qdrant(qdrant_path(data_dir), staging / QDRANT, sessions)
        return _archive(staging, directory, "sqlite", len(sessions), keep)


def back_up_postgres(database_url: str, directory: Path, keep: int, qdrant_snapshot: Path | None) -> Backup:
    """`pg_dump` of the database at `database_url` and, if given, a Qdrant server's
    collection snapshot already downloaded to `qdrant_snapshot`, into `directory`."""
    with _staging(directory) as staging:
        conninfo, environment = libpq(database_url)
        run_command(
            ["pg_dump", "--format=custom", "--no-owner", f"--file={staging / DUMP}", f"--dbname={conninfo}"],
            environment,
        )
        if qdrant_snapshot is not None:
            (staging / QDRANT).mkdir(mode=DIRECTORY_MODE)
            shutil.move(qdrant_snapshot, staging / QDRANT_SNAPSHOT)
        return _archive(staging, directory, "postgres", None, keep)


def verify_backup(path: Path, into: Path | None = None) -> dict[str, Any]:
    """Checks the backup at `path` whole: its recorded checksum if it has one, each member's
    checksum against the manifest, SQLite's integrity check of each database in it,
    `pg_restore --list` of a dump. With `into`, leaves the members there (for a restore).
    The manifest; `BackupError` with the reason otherwise."""
    if not path.is_file():
        raise BackupError(f"{path} is not a file")
    recorded = _recorded_checksum(path)
    if recorded is not None and recorded != _sha256_of(path):
        raise BackupError(f"{path.name} does not match the checksum recorded when it was written")
    with contextlib.ExitStack() as stack:
        target = into or Path(stack.enter_context(tempfile.TemporaryDirectory(dir=path.parent, prefix=".verify-")))
        try:
            # Flushed to the disk only for a restore, which renames the files into place.
            manifest = _extract(path, target, durable=into is not None)
        except (tarfile.TarError, OSError, EOFError, ValueError, KeyError) as error:
            raise BackupError(f"{path.name} cannot be read as a backup ({type(error).__name__})") from None
        for name in manifest["files"]:
            member = target / name
            if name.endswith((".db", ".sqlite")):
                _check_sqlite(member, name)
            elif name == DUMP:
                run_command(["pg_restore", "--list", str(member)], None)
        return manifest


def integrity_problem(database: Path, check: str = "quick_check") -> str | None:
    """SQLite's `quick_check` (or `integrity_check`) of `database`: None when it passes,
    else what it said."""
    try:
        with contextlib.closing(sqlite3.connect(f"{database.resolve().as_uri()}?mode=rw", uri=True)) as connection:
            rows = connection.execute(f"PRAGMA {check}").fetchall()
    except sqlite3.DatabaseError as error:
        return str(error)
    verdict = "; ".join(str(row[0]) for row in rows[:3])
    return None if verdict == "ok" else verdict


def secure_directory(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=DIRECTORY_MODE)
    directory.chmod(DIRECTORY_MODE)


# -- taking one ------------------------------------------------------------------------


@contextlib.contextmanager
def _staging(directory: Path) -> Iterator[Path]:
    secure_directory(directory)
    # Left over by a backup that was killed: nobody else backs up now (the caller holds
    # the backup lock), so they are garbage.
    for stale in directory.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in directory.glob(".backup-*.partial"):
        stale.unlink(missing_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=".staging-"))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _snapshot_sqlite(source: Path, target: Path) -> None:
    # mode=rw: never creates an empty database where there was none.
    with (
        contextlib.closing(sqlite3.connect(f"{source.resolve().as_uri()}?mode=rw", uri=True, timeout=30)) as live,
        contextlib.closing(sqlite3.connect(target)) as copy,
    ):
        # The copy is staging, verified from the archive it goes into: no journal and no
        # syncs of its own (measured: half of a backup's time over 10,000 collections).
        copy.execute("PRAGMA journal_mode=OFF")
        copy.execute("PRAGMA synchronous=OFF")
        live.backup(copy)
    target.chmod(FILE_MODE)


def _session_ids(database: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(database)) as connection:
        try:
            return {str(row[0]) for row in connection.execute("SELECT DISTINCT thread_id FROM checkpoints")}
        except sqlite3.OperationalError:  # no table yet: a database with no session
            return set()


def _snapshot_qdrant(source: Path, target: Path, sessions: set[str]) -> None:
    """The collections of `sessions` that exist, and the embedded Qdrant's meta.json
    limited to them; nothing when memory was never used."""
    meta_file = source / QDRANT_META
    if not meta_file.is_file():
        return
    taken = set()
    for session_id in sorted(sessions):
        name = COLLECTION_PREFIX + session_id
        storage = source / "collection" / name / STORAGE_FILE
        if not storage.is_file():
            continue
        copy = target / "collection" / name / STORAGE_FILE
        copy.parent.mkdir(parents=True, mode=DIRECTORY_MODE)
        try:
            _snapshot_sqlite(storage, copy)
        except sqlite3.OperationalError:  # the session was deleted meanwhile
            shutil.rmtree(copy.parent)
            continue
        taken.add(name)
    meta = _read_meta(meta_file)
    meta["collections"] = {name: config for name, config in meta.get("collections", {}).items() if name in taken}
    meta["aliases"] = {}
    meta["text_indexes"] = {name: value for name, value in meta.get("text_indexes", {}).items() if name in taken}
    target.mkdir(exist_ok=True, mode=DIRECTORY_MODE)
    (target / QDRANT_META).write_text(json.dumps(meta))
    for name in taken - set(meta["collections"]):  # created after meta.json was last written
        shutil.rmtree(target / "collection" / name)


def _read_meta(path: Path) -> dict[str, Any]:
    # qdrant-client rewrites the file in place: a read may catch it half-written.
    for _ in range(50):
        try:
            meta: dict[str, Any] = json.loads(path.read_text())
            return meta
        except (json.JSONDecodeError, FileNotFoundError):
            time.sleep(0.02)
    raise BackupError("the embedded Qdrant's meta.json could not be read")


def _archive(staging: Path, directory: Path, store: str, sessions: int | None, keep: int) -> Backup:
    created = datetime.now(UTC)
    files = {
        path.relative_to(staging).as_posix(): _sha256_of(path) for path in sorted(staging.rglob("*")) if path.is_file()
    }
    manifest = {
        "format": FORMAT,
        "created_at": created.isoformat(),
        "store": store,
        "sessions": sessions,
        "files": files,
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    name = f"backup-{created.strftime(STAMP)}-{secrets.token_hex(3)}.tar.gz"
    partial = directory / f".{name}.partial"
    with new_file(partial) as raw, tarfile.open(fileobj=raw, mode="w:gz", compresslevel=6) as tar:
        tar.add(staging / MANIFEST, MANIFEST, filter=_owner_only)
        for member in files:
            tar.add(staging / member, member, filter=_owner_only)
    try:
        verify_backup(partial)
    except BackupError:
        partial.unlink(missing_ok=True)
        raise
    final = directory / name
    os.replace(partial, final)
    checksum = _sha256_of(final)
    _write_atomically(_checksum_file(final), f"{checksum}  {name}\n")
    sync_directory(directory)
    _rotate(directory, keep)
    return Backup(final, created, final.stat().st_size, checksum, sessions)


def _owner_only(member: tarfile.TarInfo) -> tarfile.TarInfo:
    member.mode = DIRECTORY_MODE if member.isdir() else FILE_MODE
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    return member


def _rotate(directory: Path, keep: int) -> None:
    verified = [backup for backup in list_backups(directory) if backup.verified]
    for old in verified[keep:]:
        old.path.unlink(missing_ok=True)
        _checksum_file(old.path).unlink(missing_ok=True)


# -- reading one ------------------------------------------------------------------------


def _extract(path: Path, target: Path, durable: bool) -> dict[str, Any]:
    with tarfile.open(path, mode="r:gz") as tar:
        members = {member.name: member for member in tar.getmembers()}
        manifest_file = tar.extractfile(members[MANIFEST])
        assert manifest_file is not None
        manifest: dict[str, Any] = json.load(manifest_file)
        if manifest.get("format") != FORMAT:
            raise BackupError(f"{path.name} has format {manifest.get('format')!r}, not {FORMAT}")
        files: dict[str, str] = manifest["files"]
        if set(members) - {MANIFEST} != set(files):
            raise BackupError(f"{path.name} holds other files than its manifest lists")
        for name, digest in files.items():
            member = members[name]
            if not member.isfile() or Path(name).is_absolute() or ".." in Path(name).parts:
                raise BackupError(f"{path.name} holds a member that is not a plain file inside it")
            source = tar.extractfile(member)
            assert source is not None
            destination = target / name
            destination.parent.mkdir(parents=True, exist_ok=True, mode=DIRECTORY_MODE)
            hasher = hashlib.sha256()
            with new_file(destination, durable=durable) as out:
                while chunk := source.read(CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
            if hasher.hexdigest() != digest:
                raise BackupError(f"{path.name}: a member does not match its checksum")
        return manifest


def _check_sqlite(database: Path, name: str) -> None:
    problem = integrity_problem(database, "integrity_check")
    if problem is not None:
        raise BackupError(f"{name} in the backup fails SQLite's integrity check ({problem})")


def _recorded_checksum(path: Path) -> str | None:
    try:
        line = _checksum_file(path).read_text()
    except FileNotFoundError:
        return None
    checksum = line.split(" ", 1)[0]
    return checksum if re.fullmatch(r"[0-9a-f]{64}", checksum) else None


def _checksum_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


# -- files and commands ------------------------------------------------------------------


@contextlib.contextmanager
def new_file(path: Path, durable: bool = True) -> Iterator[IO[bytes]]:
    """Created 0600 whatever the umask; `durable`: flushed to the disk before it is closed."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with os.fdopen(descriptor, "wb") as file:
        yield file
        if durable:
            file.flush()
            os.fsync(file.fileno())


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    with new_file(temporary) as file:
        file.write(text.encode())
    os.replace(temporary, path)


def sync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sha256_of(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def libpq(database_url: str) -> tuple[str, dict[str, str]]:
    """The connection string without its password, and the password in the environment:
    a command line is visible to every user of the machine (`ps`)."""
    parameters = conninfo_to_dict(database_url)
    password = parameters.pop("password", None)
    environment = dict(os.environ)
    if password is not None:
        environment["PGPASSWORD"] = str(password)
    return make_conninfo(**{key: str(value) for key, value in parameters.items()}), environment


def run_command(command: list[str], environment: dict[str, str] | None) -> None:
    if shutil.which(command[0]) is None:
        raise BackupError(f"{command[0]} is not installed (Debian: postgresql-client)")
    result = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        # What it said names hosts and databases: for the terminal, not the log.
        raise BackupError(f"{command[0]} failed (exit status {result.returncode})", result.stderr.strip())
