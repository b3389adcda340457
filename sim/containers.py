"""The file types Groq's transcription endpoint accepts, and the container each must hold.

The endpoint refuses a file whose bytes do not match its extension: the defect the app
must not repeat is sending WebM named `.wav`. The real
service's decoder may cope with some mismatches; the simulator is stricter on purpose, so
such a bug fails loudly in tests. What the bytes are, and how long they play, is read by
`common.audio`, the same code the app uses (docs/simulator.md).
"""

from __future__ import annotations

from common.audio import FLAC, MP3, MP4, OGG, WAV, WEBM, AudioFormat, sniff

EXTENSIONS: dict[str, AudioFormat] = {
    "flac": FLAC,
    "mp3": MP3,
    "mp4": MP4,
    "mpeg": MP3,
    "mpga": MP3,
    "m4a": MP4,
    "ogg": OGG,
    "opus": OGG,
    "wav": WAV,
    "webm": WEBM,
}


def matches(extension: str, data: bytes) -> bool:
    return sniff(data) == EXTENSIONS[extension]
