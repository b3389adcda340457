"""FLAC: the `fLaC` signature (after an ID3v2 tag too); the duration from STREAMINFO, the
total samples over the sample rate."""

from __future__ import annotations

from common.audio.binary import Malformed, be, u8
from common.audio.id3 import skip_id3v2


def magic(data: bytes) -> bool:
    if data.startswith(b"fLaC"):
        return True
    if not data.startswith(b"ID3"):
        return False
    try:
        start = skip_id3v2(data)
    except Malformed:
        return False  # the tag says nothing of what follows it
    return data[start : start + 4] == b"fLaC"


def holds_audio(data: bytes) -> bool:
    return True


def duration(data: bytes) -> float | None:
    """None when STREAMINFO leaves the total unknown (0), as an encoder writing to a pipe does."""
    start = skip_id3v2(data)
    if data[start : start + 4] != b"fLaC":
        raise Malformed
    block_type, block_length = u8(data, start + 4) & 0x7F, be(data, start + 5, 3)
    if block_type != 0 or block_length < 34 or start + 8 + 34 > len(data):  # STREAMINFO comes first
        raise Malformed
    # 20 bits sample rate, 3 channels, 5 bits per sample, 36 total samples (0 = unknown).
    fields = be(data, start + 8 + 10, 8)
    sample_rate, total_samples = fields >> 44, fields & ((1 << 36) - 1)
    if sample_rate == 0:
        raise Malformed
    return total_samples / sample_rate if total_samples else None
