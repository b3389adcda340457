"""MP3 without an MP3 encoder: a valid MPEG audio Layer III stream of silent frames.

Encoding real MP3 takes a psychoacoustic encoder this project does not ship. A silent
frame is simple to make correctly, though: a 4-byte header, side information of zeros
(no Huffman data, so every sample decodes to 0) and zero padding to the frame length.
Repeated for the duration of the speech, it gives a stream any MP3 parser and browser
accepts, of the right length, at the requested sample rate and constant bit rate.

When `lame` is installed (SIM_MP3_ENCODER=auto or lame) the speech PCM is encoded by it
instead, and the MP3 is audible.

Frame arithmetic (ISO/IEC 11172-3 and 13818-3):
- MPEG-1 (32, 44.1, 48 kHz): 1152 samples a frame, 144 * bitrate / rate bytes;
- MPEG-2 (16, 22.05, 24 kHz): 576 samples a frame, 72 * bitrate / rate bytes;
- the fractional byte is paid back by the padding bit, set on the frames where the
  running remainder overflows, so the average bit rate is exact.
"""

from __future__ import annotations

import math
import subprocess
from dataclasses import dataclass

LAME_TIMEOUT_SECONDS = 60.0

# Bit-rate indices of Layer III, kbit/s (index 0 is "free format", 15 is forbidden).
MPEG1_BITRATES = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
MPEG2_BITRATES = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
MPEG1_RATES = (44100, 48000, 32000)
MPEG2_RATES = (22050, 24000, 16000)


class Mp3Error(Exception):
    """A format the frame maths cannot express, or lame failing."""


@dataclass(frozen=True)
class FrameFormat:
    mpeg1: bool
    rate: int
    kbps: int

    @property
    def samples_per_frame(self) -> int:
        return 1152 if self.mpeg1 else 576

    @property
    def coefficient(self) -> int:
        """Bytes per frame = coefficient * bitrate / rate (+1 when padded)."""
        return 144 if self.mpeg1 else 72

    @property
    def side_info_bytes(self) -> int:
        return 17 if self.mpeg1 else 9  # mono

    def header(self, padded: bool) -> bytes:
        rates = MPEG1_RATES if self.mpeg1 else MPEG2_RATES
        bitrates = MPEG1_BITRATES if self.mpeg1 else MPEG2_BITRATES
        # 11 sync bits, version (11 = MPEG-1, 10 = MPEG-2), layer (01 = III), no CRC (1).
        second = 0xFB if self.mpeg1 else 0xF3
        third = bitrates.index(self.kbps) << 4 | rates.index(self.rate) << 2 | int(padded) << 1
        # Channel mode 11 (mono), no mode extension, not copyrighted, original, no emphasis.
        fourth = 0b1100_0100
        return bytes((0xFF, second, third, fourth))


def frame_format(rate: int, kbps: int) -> FrameFormat:
    if rate in MPEG1_RATES and kbps in MPEG1_BITRATES[1:]:
        return FrameFormat(True, rate, kbps)
    if rate in MPEG2_RATES and kbps in MPEG2_BITRATES[1:]:
        return FrameFormat(False, rate, kbps)
    raise Mp3Error(f"no MPEG-1/2 Layer III format for {rate} Hz at {kbps} kbit/s")


def silent_mp3(seconds: float, rate: int, kbps: int) -> bytes:
    """Silent CBR frames covering at least `seconds` (at least one frame)."""
    form = frame_format(rate, kbps)
    frames = max(1, math.ceil(seconds * rate / form.samples_per_frame))
    numerator = form.coefficient * kbps * 1000
    base, fraction = divmod(numerator, rate)
    out = bytearray()
    remainder = 0
    bodies: dict[bool, bytes] = {}
    for _ in range(frames):
        remainder += fraction
        padded = remainder >= rate
        if padded:
            remainder -= rate
        if padded not in bodies:
            length = base + int(padded)
            bodies[padded] = form.header(padded) + bytes(length - 4)
        out += bodies[padded]
    return bytes(out)


def lame_mp3(pcm: bytes, rate: int, kbps: int, command: str) -> bytes:
    """`pcm` (16-bit little-endian mono at `rate`) encoded by lame, CBR at `kbps`."""
    frame_format(rate, kbps)  # refuse what MP3 cannot hold before starting lame
    arguments = [
        command,
        "--quiet",
        "-r",
        "-s",
        f"{rate / 1000:g}",
        "--bitwidth",
        "16",
        "--signed",
        "--little-endian",
        "-m",
        "m",
        "--cbr",
        "-b",
        str(kbps),
        "--resample",
        f"{rate / 1000:g}",
        "-",
        "-",
    ]
    try:
        completed = subprocess.run(arguments, input=pcm, capture_output=True, timeout=LAME_TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise Mp3Error(f"lame did not run: {error}") from None
    if completed.returncode != 0 or not completed.stdout:
        raise Mp3Error(f"lame exited with {completed.returncode}: {completed.stderr[:200]!r}")
    return completed.stdout


def frame_length(header: bytes) -> int | None:
    """The length of the Layer III frame this 4-byte header starts, or None when it is not
    one (MPEG-1 or MPEG-2, the versions the simulator writes and lame is asked for)."""
    if len(header) < 4 or header[0] != 0xFF or header[1] & 0xE0 != 0xE0:
        return None
    version, layer = (header[1] >> 3) & 0b11, (header[1] >> 1) & 0b11
    bitrate_index, rate_index = header[2] >> 4, (header[2] >> 2) & 0b11
    if version not in (0b11, 0b10) or layer != 0b01 or bitrate_index in (0, 15) or rate_index == 3:
        return None
    mpeg1 = version == 0b11
    kbps = (MPEG1_BITRATES if mpeg1 else MPEG2_BITRATES)[bitrate_index]
    rate = (MPEG1_RATES if mpeg1 else MPEG2_RATES)[rate_index]
    padded = (header[2] >> 1) & 1
    return (144 if mpeg1 else 72) * kbps * 1000 // rate + padded


def frame_chunks(data: bytes, limit: int) -> list[bytes]:
    """`data` in pieces of whole frames, each at most `limit` bytes (or a single frame), so
    that every piece plays and pieces concatenate. Whatever the frame walk cannot read (an
    encoder's output that is not plain frames) goes whole into the last piece."""
    units: list[bytes] = []
    offset = 0
    while offset < len(data):
        length = frame_length(data[offset : offset + 4])
        if length is None or offset + length > len(data):
            units.append(data[offset:])
            break
        units.append(data[offset : offset + length])
        offset += length
    chunks: list[bytes] = []
    current = bytearray()
    for unit in units:
        if current and len(current) + len(unit) > limit:
            chunks.append(bytes(current))
            current.clear()
        current += unit
    if current:
        chunks.append(bytes(current))
    return chunks
