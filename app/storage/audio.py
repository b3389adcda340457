"""Reply audio: files under `APP_DATA_DIR/audio`, readable only by the app's user, or rows
of the PostgreSQL database at `APP_DATABASE_URL`, where every replica finds the audio
any replica made (docs/app.md#several-replicas). One class for each behind the
`AudioStore` protocol.

Audio never goes into the conversation state (it would grow every checkpoint); the state
keeps only the id. Audio older than `APP_AUDIO_RETENTION_HOURS` is deleted by the
retention sweep; a deleted session's audio goes with it.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from psycopg import AsyncConnection
from psycopg.rows import DictRow
from psycopg_pool import AsyncConnectionPool

AUDIO_ID = re.compile(r"^[0-9a-f]{32}$")
EXTENSIONS = {"audio/mpeg": "mp3", "audio/wav": "wav", "audio/ogg": "ogg", "audio/pcm": "pcm"}
CONTENT_TYPES = {extension: content_type for content_type, extension in EXTENSIONS.items()}

CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS reply_audio (
    audio_id text PRIMARY KEY,
    content_type text NOT NULL,
    content bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)"""
CREATE_INDEX = "CREATE INDEX IF NOT EXISTS reply_audio_created_at ON reply_audio (created_at)"
INSERT = "INSERT INTO reply_audio (audio_id, content_type, content) VALUES (%s, %s, %s)"
SELECT = "SELECT content_type, content FROM reply_audio WHERE audio_id = %s"
DELETE = "DELETE FROM reply_audio WHERE audio_id = ANY(%s)"
DELETE_OLDER_THAN = "DELETE FROM reply_audio WHERE created_at < now() - make_interval(secs => %s)"
COUNT_OLDER_THAN = "SELECT count(*) AS older FROM reply_audio WHERE created_at < now() - make_interval(secs => %s)"


@dataclass(frozen=True)
class StoredAudio:
    content: bytes
    content_type: str


class AudioStore(Protocol):
    async def save(self, audio: bytes, content_type: str) -> str:
        """Keeps the audio; its new id."""

    async def find(self, audio_id: str) -> StoredAudio | None:
        """The audio, for a well-formed id that exists."""

    async def delete(self, audio_ids: list[str]) -> None: ...

    async def delete_older_than(self, seconds: float) -> int:
        """Deletes audio kept longer than `seconds`; how many."""

    async def count_older_than(self, seconds: float) -> int:
        """How many `delete_older_than` would delete now (a dry run of the sweep)."""


class AudioFiles:
    """One file per reply under `directory`, created 0600, renamed into place once written."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def setup(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    async def save(self, audio: bytes, content_type: str) -> str:
        audio_id = uuid.uuid4().hex
        path = self.directory / f"{audio_id}.{EXTENSIONS.get(content_type, 'bin')}"
        # Under a name no request looks for until it is whole; created 0600 from the start:
        # no moment when another user could read it. One a crash left behind is swept with
        # the expired audio.
        partial = path.with_name(f".{path.name}.partial")
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(audio)
            os.replace(partial, path)
        except OSError:  # a full disk: what was written gives its room back now
            partial.unlink(missing_ok=True)
            raise
        return audio_id

    async def find(self, audio_id: str) -> StoredAudio | None:
        found = self._path(audio_id)
        if found is None:
            return None
        path, content_type = found
        try:
            return StoredAudio(path.read_bytes(), content_type)
        except FileNotFoundError:  # deleted meanwhile
            return None

    async def delete(self, audio_ids: list[str]) -> None:
        for audio_id in audio_ids:
            found = self._path(audio_id)
            if found is not None:
                found[0].unlink(missing_ok=True)

    async def delete_older_than(self, seconds: float) -> int:
        older = self._older_than(seconds)
        deleted = 0
        for path in older:
            try:
                path.unlink()
                deleted += 1
            except FileNotFoundError:
                continue
        return deleted

    async def count_older_than(self, seconds: float) -> int:
        return len(self._older_than(seconds))

    def _older_than(self, seconds: float) -> list[Path]:
        cutoff = time.time() - seconds
        older = []
        for path in self.directory.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    older.append(path)
            except FileNotFoundError:  # deleted meanwhile
                continue
        return older

    def _path(self, audio_id: str) -> tuple[Path, str] | None:
        if not AUDIO_ID.match(audio_id):
            return None
        for extension, content_type in CONTENT_TYPES.items():
            path = self.directory / f"{audio_id}.{extension}"
            if path.is_file():
                return path, content_type
        return None


async def create_audio_table(connection: AsyncConnection[DictRow]) -> None:
    """Under the set-up lock (`app.storage.stores`), as replicas starting together would collide."""
    await connection.execute(CREATE_TABLE)
    await connection.execute(CREATE_INDEX)


class PostgresAudio:
    """The table `reply_audio`, on the checkpointer's pool."""

    def __init__(self, pool: AsyncConnectionPool[AsyncConnection[DictRow]]) -> None:
        self._pool = pool

    async def save(self, audio: bytes, content_type: str) -> str:
        audio_id = uuid.uuid4().hex
        async with self._pool.connection() as connection:
            await connection.execute(INSERT, (audio_id, content_type, audio))
        return audio_id

    async def find(self, audio_id: str) -> StoredAudio | None:
        if not AUDIO_ID.match(audio_id):
            return None
        async with self._pool.connection() as connection:
            row = await (await connection.execute(SELECT, (audio_id,))).fetchone()
        return None if row is None else StoredAudio(bytes(row["content"]), str(row["content_type"]))

    async def delete(self, audio_ids: list[str]) -> None:
        if audio_ids:
            async with self._pool.connection() as connection:
                await connection.execute(DELETE, (audio_ids,))

    async def delete_older_than(self, seconds: float) -> int:
        async with self._pool.connection() as connection:
            return (await connection.execute(DELETE_OLDER_THAN, (seconds,))).rowcount

    async def count_older_than(self, seconds: float) -> int:
        async with self._pool.connection() as connection:
            row = await (await connection.execute(COUNT_OLDER_THAN, (seconds,))).fetchone()
        return 0 if row is None else int(row["older"])
