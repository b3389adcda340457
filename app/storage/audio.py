"""Reply audio, as files under `APP_DATA_DIR/audio`, readable only by the app's user.

Audio never goes into the conversation state (it would grow every checkpoint); the state
keeps only the id. Files older than `APP_AUDIO_RETENTION_HOURS` are deleted by the
retention sweep; a deleted session's files go with it. With several app replicas the
directory must be a shared volume (docs/app.md#state-and-storage).
"""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

AUDIO_ID = re.compile(r"^[0-9a-f]{32}$")
EXTENSIONS = {"audio/mpeg": "mp3", "audio/wav": "wav", "audio/ogg": "ogg", "audio/pcm": "pcm"}
CONTENT_TYPES = {extension: content_type for content_type, extension in EXTENSIONS.items()}


class AudioStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def setup(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def save(self, audio: bytes, content_type: str) -> str:
        audio_id = uuid.uuid4().hex
        path = self.directory / f"{audio_id}.{EXTENSIONS.get(content_type, 'bin')}"
        # Created 0600 from the start: no moment when another user could read it.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(audio)
        return audio_id

    def find(self, audio_id: str) -> tuple[Path, str] | None:
        """The file and its content type, for a well-formed id that exists."""
        if not AUDIO_ID.match(audio_id):
            return None
        for extension, content_type in CONTENT_TYPES.items():
            path = self.directory / f"{audio_id}.{extension}"
            if path.is_file():
                return path, content_type
        return None

    def delete(self, audio_ids: list[str]) -> None:
        for audio_id in audio_ids:
            found = self.find(audio_id)
            if found is not None:
                found[0].unlink(missing_ok=True)

    def delete_older_than(self, seconds: float) -> int:
        cutoff = time.time() - seconds
        deleted = 0
        for path in self.directory.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    deleted += 1
            except FileNotFoundError:
                continue
        return deleted
