"""MPEG audio (MP3, and Layers I and II): frame headers after optional ID3v2 tags; the
duration from a Xing/Info or VBRI frame count, else the bit rate over the bytes (CBR)."""

from __future__ import annotations

from typing import NamedTuple

from common.audio.binary import Malformed, be
from common.audio.id3 import skip_id3v2

# Some files have padding or junk between the tag and the first frame; beyond this much, give up.
_SEARCH_WINDOW = 16 * 1024

# kbit/s by (MPEG-1?, layer), index 0 ("free format") and 15 (forbidden) excluded below.
_BITRATES = {
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
# Hz by the two version bits: 11 MPEG-1, 10 MPEG-2, 00 MPEG-2.5 (01 is reserved).
_RATES = {0b11: (44100, 48000, 32000), 0b10: (22050, 24000, 16000), 0b00: (11025, 12000, 8000)}
# Layer III side information, by (MPEG-1?, mono?); a Xing header follows it.
_SIDE_INFO_BYTES = {(True, True): 17, (True, False): 32, (False, True): 9, (False, False): 17}


class _Frame(NamedTuple):
    mpeg1: bool
    layer: int
    bitrate: int  # bit/s
    sample_rate: int
    samples: int  # per frame
    length: int  # bytes, header included
    mono: bool


def magic(data: bytes) -> bool:
    return data.startswith(b"ID3") or data[:1] == b"\xff"


def holds_audio(data: bytes) -> bool:
    """A tag that is cut short still says MP3 (its duration will be undecodable); a
    malformed one says nothing. Without a tag, the first frame must be confirmed."""
    if data.startswith(b"ID3"):
        try:
            skip_id3v2(data)
        except Malformed:
            return len(data) < 10
        return True
    frame = _frame(data, 0)
    return frame is not None and _confirmed(data, 0, frame)


def duration(data: bytes) -> float:
    found = _find_frame(data, skip_id3v2(data))
    if found is None:
        raise Malformed
    position, frame = found
    frames = _xing_frames(data, position, frame) or _vbri_frames(data, position)
    if frames:
        return frames * frame.samples / frame.sample_rate
    # No frame count: assume a constant bit rate over the bytes after the first frame's start.
    end = len(data)
    if end - 128 >= position and data[end - 128 : end - 125] == b"TAG":  # ID3v1 at the very end
        end -= 128
    return (end - position) * 8 / frame.bitrate


def _frame(data: bytes, position: int) -> _Frame | None:
    """The MPEG audio frame header at `position`, or None when those bytes are not one."""
    if position < 0 or position + 4 > len(data) or data[position] != 0xFF:
        return None
    second, third, fourth = data[position + 1], data[position + 2], data[position + 3]
    version, layer_bits = (second >> 3) & 3, (second >> 1) & 3
    bitrate_index, rate_index, padding = third >> 4, (third >> 2) & 3, (third >> 1) & 1
    if (
        second & 0xE0 != 0xE0
        or version == 0b01
        or layer_bits == 0  # also rules out ADTS AAC, whose "layer" is 00
        or bitrate_index in (0, 15)
        or rate_index == 3
        or fourth & 3 == 0b10  # reserved emphasis
    ):
        return None
    mpeg1, layer = version == 0b11, 4 - layer_bits
    bitrate = _BITRATES[(mpeg1, layer)][bitrate_index] * 1000
    sample_rate = _RATES[version][rate_index]
    if layer == 1:
        samples, length = 384, (12 * bitrate // sample_rate + padding) * 4
    else:
        samples = 1152 if mpeg1 or layer == 2 else 576
        length = samples // 8 * bitrate // sample_rate + padding
    return _Frame(mpeg1, layer, bitrate, sample_rate, samples, length, fourth >> 6 == 3)


def _confirmed(data: bytes, position: int, frame: _Frame, *, expected: bool = True) -> bool:
    """Whether the next frame is where `frame` says and alike: two bytes 0xFF 0xFx are common
    in any binary, two consistent frame headers a frame apart are not. A frame that ends
    the data (a one-frame file, or a cut upload) cannot be checked; it is believed only where
    a frame was `expected` (at the start, or right after the tag), not one found by a scan."""
    following = position + frame.length
    if following + 4 > len(data) or data[following : following + 3] == b"TAG":
        return expected
    other = _frame(data, following)
    return (
        other is not None
        and other.mpeg1 == frame.mpeg1
        and other.layer == frame.layer
        and other.sample_rate == frame.sample_rate
    )


def _find_frame(data: bytes, start: int) -> tuple[int, _Frame] | None:
    stop = min(len(data) - 3, start + _SEARCH_WINDOW)
    position = start
    while position < stop:
        position = data.find(b"\xff", position, stop)
        if position < 0:
            return None
        frame = _frame(data, position)
        if frame is not None and _confirmed(data, position, frame, expected=position == start):
            return position, frame
        position += 1
    return None


def _xing_frames(data: bytes, position: int, frame: _Frame) -> int | None:
    """The frame count of a Xing (VBR) or Info (CBR, by LAME) header in the first frame."""
    side_info = _SIDE_INFO_BYTES[(frame.mpeg1, frame.mono)]
    for offset in (4 + side_info, 6 + side_info):  # after a 16-bit CRC, if the writer counted one
        tag = position + offset
        if data[tag : tag + 4] in (b"Xing", b"Info"):
            flags = be(data, tag + 4, 4)
            return be(data, tag + 8, 4) if flags & 1 else None
    return None


def _vbri_frames(data: bytes, position: int) -> int | None:
    """The frame count of a Fraunhofer VBRI header, always 32 bytes after the frame header."""
    tag = position + 36
    if data[tag : tag + 4] != b"VBRI":
        return None
    return be(data, tag + 14, 4)
