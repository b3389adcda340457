"""Speech audio as 16-bit little-endian mono PCM: espeak-ng when it is installed, else tones.

The tone stands in for speech: one beep per word, its length growing with the word and its
pitch chosen by the word, with a pause between words. Same text, same bytes.

Pure Python, so long texts are built from cached one-second blocks rather than sample by
sample: a 5,000-character text (about five minutes at 44.1 kHz) takes well under a second.
"""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import zlib
from array import array
from functools import lru_cache

SECONDS_PER_CHARACTER = 0.06  # about 15 characters a second, as people speak
MIN_WORD_SECONDS = 0.12
PAUSE_SECONDS = 0.08
SILENCE_SECONDS = 0.25  # what a text without words (only spaces) sounds like
FADE_SECONDS = 0.005  # ramps at both ends of a beep, so that beeps do not click
AMPLITUDE = 0.3 * 32767
# Whole hertz: a one-second block then holds whole periods and repeats without a seam.
PITCHES_HZ = (220, 247, 262, 294, 330, 349, 392, 440)

ESPEAK_TIMEOUT_SECONDS = 60.0


class SpeechError(Exception):
    """The speech engine failed; the caller answers 500 as the provider would."""


def word_seconds(word: str) -> float:
    return max(MIN_WORD_SECONDS, SECONDS_PER_CHARACTER * len(word))


def tone_seconds(text: str) -> float:
    """How long the tone for `text` lasts, without making it."""
    words = text.split()
    if not words:
        return SILENCE_SECONDS
    return sum(word_seconds(word) + PAUSE_SECONDS for word in words)


def _to_little_endian(samples: array[int]) -> bytes:
    if sys.byteorder == "big":
        samples = array("h", samples)
        samples.byteswap()
    return samples.tobytes()


@lru_cache(maxsize=64)
def _one_second(pitch: int, rate: int) -> array[int]:
    step = 2 * math.pi * pitch / rate
    return array("h", (int(AMPLITUDE * math.sin(step * n)) for n in range(rate)))


def _beep(pitch: int, count: int, rate: int) -> array[int]:
    block = _one_second(pitch, rate)
    repeats = count // rate + 1
    samples = (block * repeats)[:count]
    fade = min(int(FADE_SECONDS * rate), count // 2)
    for n in range(fade):
        samples[n] = samples[n] * n // fade
        samples[count - 1 - n] = samples[count - 1 - n] * n // fade
    return samples


def tone_pcm(text: str, rate: int) -> bytes:
    """One beep per word, pitch by the word's CRC-32 (Python's `hash` varies per process)."""
    words = text.split()
    if not words:
        return bytes(2 * int(SILENCE_SECONDS * rate))
    out = array("h")
    pause = array("h", bytes(2 * int(PAUSE_SECONDS * rate)))
    for word in words:
        pitch = PITCHES_HZ[zlib.crc32(word.encode()) % len(PITCHES_HZ)]
        out.extend(_beep(pitch, int(word_seconds(word) * rate), rate))
        out.extend(pause)
    return _to_little_endian(out)


def parse_wav(data: bytes) -> tuple[int, bytes]:
    """(sample rate, 16-bit mono PCM) of a RIFF/WAVE file of 16-bit PCM.

    espeak-ng writes to a pipe, so it cannot go back to fill in the sizes: its header says
    0x7FFFFFFF. A data chunk that claims more than the file holds runs to the end.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise SpeechError("not a RIFF/WAVE file")
    position = 12
    channels = rate = bits = 0
    while position + 8 <= len(data):
        chunk_id = data[position : position + 4]
        (size,) = struct.unpack("<I", data[position + 4 : position + 8])
        start = position + 8
        if chunk_id == b"fmt ":
            audio_format, channels, rate = struct.unpack("<HHI", data[start : start + 8])
            (bits,) = struct.unpack("<H", data[start + 14 : start + 16])
            if audio_format != 1 or bits != 16 or channels < 1:
                raise SpeechError(f"unsupported WAV encoding: format {audio_format}, {bits} bits")
        elif chunk_id == b"data":
            if not rate:
                raise SpeechError("WAV data before its format")
            pcm = data[start : min(start + size, len(data))]
            pcm = pcm[: len(pcm) - len(pcm) % (2 * channels)]
            if channels > 1:  # keep the first channel
                samples = array("h", pcm)
                pcm = samples[::channels].tobytes()
            return rate, pcm
        position = start + size + (size & 1)
    raise SpeechError("WAV file without data")


def resample(pcm: bytes, source_rate: int, target_rate: int) -> bytes:
    """Linear interpolation between neighbouring samples: simple, and plenty for speech
    that a test or a developer only needs to hear, not to judge."""
    if source_rate == target_rate or not pcm:
        return pcm
    samples = array("h", pcm)
    if sys.byteorder == "big":
        samples.byteswap()
    count = len(samples)
    out_count = max(1, count * target_rate // source_rate)
    last = count - 1
    ratio = source_rate / target_rate
    out = array("h", bytes(2 * out_count))
    for n in range(out_count):
        position = n * ratio
        index = int(position)
        if index >= last:
            out[n] = samples[last]
            continue
        fraction = position - index
        out[n] = int(samples[index] + (samples[index + 1] - samples[index]) * fraction)
    return _to_little_endian(out)


def espeak_pcm(text: str, rate: int, command: str) -> bytes:
    """espeak-ng's speech for `text`, resampled to `rate`. The text goes through standard
    input, so a text starting with `-` is not taken for an option."""
    try:
        completed = subprocess.run(
            [command, "--stdin", "--stdout"],
            input=text.encode(),
            capture_output=True,
            timeout=ESPEAK_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SpeechError(f"espeak-ng did not run: {error}") from None
    if completed.returncode != 0:
        raise SpeechError(f"espeak-ng exited with {completed.returncode}: {completed.stderr[:200]!r}")
    source_rate, pcm = parse_wav(completed.stdout)
    return resample(pcm, source_rate, rate)
