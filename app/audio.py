"""What voice upload the app will transcribe: a supported format, told by the bytes, within
the byte and duration limits; else `AudioRejected` with a stable code (docs/app.md).

Browsers label recordings loosely (a `blob` of `audio/webm;codecs=opus`, Safari's
`audio/mp4`, a WAV sent as `application/octet-stream`), and the transcriber (Groq Whisper)
picks its decoder by the file name's extension. So the name sent on comes from the bytes
(`common.audio`), never from the client's file name or content type. The duration lets the
app refuse a recording that is too long before it pays for a transcription.
"""

from __future__ import annotations

from typing import Literal

from common.audio import WEBM, AudioFormat, Malformed, read_duration, sniff

__all__ = [
    "UNDECODABLE_MESSAGE",
    "UNSUPPORTED_MESSAGE",
    "AudioFormat",
    "AudioRejected",
    "RejectionCode",
    "inspect_upload",
]

RejectionCode = Literal["audio_empty", "audio_too_large", "audio_unsupported", "audio_undecodable", "audio_too_long"]


class AudioRejected(Exception):
    """An upload the app will not transcribe. `code` is stable, for clients to branch on;
    `message` is for people and names nothing internal."""

    def __init__(self, code: RejectionCode, message: str) -> None:
        super().__init__(message)
        self.code: RejectionCode = code
        self.message = message


UNSUPPORTED_MESSAGE = "This audio format is not supported. Send WAV, MP3, Ogg (Opus or Vorbis), WebM, MP4/M4A or FLAC."
UNDECODABLE_MESSAGE = "The recording could not be read. It may be damaged or incomplete."


def inspect_upload(data: bytes, *, max_bytes: int, max_seconds: float) -> tuple[AudioFormat, float | None]:
    """The upload's format and duration, or `AudioRejected` saying why it will not be
    transcribed. Checked in this order: empty, too large, unsupported, undecodable, too long.

    The duration is None only for WebM: browsers' MediaRecorder writes no Duration element,
    so such a recording is accepted and the byte cap bounds it. For every other format a
    duration that cannot be read means the file is undecodable.
    """
    if not data:
        raise AudioRejected("audio_empty", "The recording is empty.")
    if len(data) > max_bytes:
        raise AudioRejected(
            "audio_too_large", f"The recording is larger than the {_describe_bytes(max_bytes)} accepted."
        )
    fmt = sniff(data)
    if fmt is None:
        raise AudioRejected("audio_unsupported", UNSUPPORTED_MESSAGE)
    try:
        seconds = read_duration(data, fmt)
    except Malformed:
        raise AudioRejected("audio_undecodable", UNDECODABLE_MESSAGE) from None
    if seconds is None:
        if fmt != WEBM:
            raise AudioRejected("audio_undecodable", UNDECODABLE_MESSAGE)
    elif seconds > max_seconds:
        raise AudioRejected(
            "audio_too_long", f"The recording is longer than the {_describe_seconds(max_seconds)} accepted."
        )
    return fmt, seconds


def _describe_bytes(count: int) -> str:
    for unit, size in (("MB", 1024 * 1024), ("KB", 1024)):
        if count >= size:
            return f"{round(count / size, 1):g} {unit}"
    return f"{max(count, 0)} bytes"


def _describe_seconds(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 == 0:
        minutes = int(seconds // 60)
        return "1 minute" if minutes == 1 else f"{minutes} minutes"
    return f"{seconds:g} seconds"
