"""WAV (RIFF/WAVE): the duration is the `data` chunk's size over the `fmt ` chunk's byte rate."""

from __future__ import annotations

from common.audio.binary import Malformed, le

_MAX_CHUNKS = 1024
_STREAMING_SIZES = (0, 0xFFFFFFFF)  # written by recorders that never seek back to fix the size


def magic(data: bytes) -> bool:
    return data.startswith(b"RIFF")


def holds_audio(data: bytes) -> bool:
    return data[8:12] == b"WAVE"  # not AVI, WebP or another RIFF form


def duration(data: bytes) -> float:
    if not data.startswith(b"RIFF") or data[8:12] != b"WAVE":
        raise Malformed
    byte_rate: int | None = None
    audio_bytes: int | None = None
    position = 12
    for _ in range(_MAX_CHUNKS):
        if position + 8 > len(data) or (byte_rate is not None and audio_bytes is not None):
            break
        chunk_id, size, body = data[position : position + 4], le(data, position + 4, 4), position + 8
        if chunk_id == b"fmt ":
            if size < 16:
                raise Malformed
            byte_rate = le(data, body + 8, 4)
        elif chunk_id == b"data":
            available = len(data) - body
            if size in _STREAMING_SIZES or size > available:  # unknown, or the upload is cut short
                audio_bytes = available
                break  # nothing known follows
            audio_bytes = size
        position = body + size + (size & 1)  # chunks are padded to an even length
    if byte_rate is None or audio_bytes is None or byte_rate == 0:
        raise Malformed
    return audio_bytes / byte_rate
