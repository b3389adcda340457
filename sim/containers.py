"""Which audio container a file really is, from its first bytes, and how long it plays.

The transcription endpoint refuses a file whose bytes do not match its extension: the
defect the app must not repeat is sending WebM named `.wav` (docs/seed-app.md, defect 6).
The real service's decoder may cope with some mismatches; the simulator is stricter on
purpose, so such a bug fails loudly in tests.
"""

from __future__ import annotations

import struct
from enum import StrEnum


class Container(StrEnum):
    wav = "wav"
    mpeg_audio = "mpeg-audio"  # MP3 and other MPEG audio: ID3 tag or frame sync
    ogg = "ogg"
    webm = "webm"  # Matroska/EBML
    mp4 = "mp4"  # ISO base media (mp4, m4a)
    flac = "flac"


# The extensions Groq accepts, and the container each must hold.
EXTENSIONS: dict[str, Container] = {
    "flac": Container.flac,
    "mp3": Container.mpeg_audio,
    "mp4": Container.mp4,
    "mpeg": Container.mpeg_audio,
    "mpga": Container.mpeg_audio,
    "m4a": Container.mp4,
    "ogg": Container.ogg,
    "opus": Container.ogg,
    "wav": Container.wav,
    "webm": Container.webm,
}

# Without a container-specific length, assume a speech codec's typical 128 kbit/s.
DEFAULT_BYTES_PER_SECOND = 16_000


def sniff(data: bytes) -> Container | None:
    """The container the bytes start like, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return Container.wav
    if data[:4] == b"OggS":
        return Container.ogg
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return Container.webm
    if data[4:8] == b"ftyp":
        return Container.mp4
    if data[:4] == b"fLaC":
        return Container.flac
    if data[:3] == b"ID3" or (len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return Container.mpeg_audio
    return None


def matches(extension: str, data: bytes) -> bool:
    return sniff(data) is EXTENSIONS[extension]


def wav_seconds(data: bytes) -> float | None:
    """The duration a WAV header declares: data size over byte rate."""
    position = 12
    byte_rate = 0
    while position + 8 <= len(data):
        chunk_id = data[position : position + 4]
        (size,) = struct.unpack("<I", data[position + 4 : position + 8])
        if chunk_id == b"fmt " and position + 20 <= len(data):
            (byte_rate,) = struct.unpack("<I", data[position + 16 : position + 20])
        elif chunk_id == b"data":
            if not byte_rate:
                return None
            seconds: float = min(size, len(data) - position - 8) / byte_rate
            return seconds
        position += 8 + size + (size & 1)
    return None


def estimated_seconds(container: Container, data: bytes) -> float:
    if container is Container.wav:
        seconds = wav_seconds(data)
        if seconds is not None:
            return seconds
    return len(data) / DEFAULT_BYTES_PER_SECOND
