"""What an audio file is, told by its bytes, and how long it plays, told by its headers.

One registry of containers drives both answers: the app reads an upload's format and
duration with it (docs/app.md), and the provider simulator checks that a transcription
upload is what its extension says and reports its duration with it (docs/simulator.md).
It lives in `common/`, not in `app/`, so that the simulator, which stands in for Groq,
depends on no part of the app it is there to test.

| format | recognised by                                | duration from                               |
|--------|----------------------------------------------|---------------------------------------------|
| wav    | `RIFF....WAVE`                               | `fmt ` byte rate and `data` size            |
| mp3    | ID3v2 tag, or an MPEG audio frame at 0       | Xing/Info or VBRI frame count, else CBR     |
| ogg    | `OggS`, first packet `OpusHead`/`\\x01vorbis` | last page's granule position                |
| webm   | EBML header, DocType `webm` or `matroska`    | Segment > Info > Duration (often absent)    |
| mp4    | `ftyp` box at offset 4                       | mvhd, else mehd, else the last fragment     |
| flac   | `fLaC` (after an ID3v2 tag too)              | STREAMINFO total samples / sample rate      |

Only headers and metadata are read; no audio is decoded. Every walk is bounded (a number
of chunks, boxes or elements; a fixed window after an ID3 tag and at the end of an Ogg
stream), so the work does not grow with hostile input. `measure=True` also reads the
media's own timestamps where the headers declare no duration (WebM: every block's), a walk
bounded by a larger number of elements. Reads past the end or values that contradict the
format raise `Malformed`: arbitrary bytes never raise anything else.

A container recognised but holding something that is surely not supported audio (an Ogg
stream of another codec, an EBML file of another DocType, a HEIF image in an ISO box
structure) is no format; a recognised container whose insides cannot be read (cut short,
contradictory) is `Malformed` when its duration is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from common.audio import flac, mp3, mp4, ogg, wav, webm
from common.audio.binary import Malformed

__all__ = [
    "FLAC",
    "FORMATS",
    "MP3",
    "MP4",
    "OGG",
    "WAV",
    "WEBM",
    "AudioFormat",
    "Malformed",
    "duration_seconds",
    "read_duration",
    "sniff",
]


@dataclass(frozen=True, slots=True)
class AudioFormat:
    name: str  # "wav" | "mp3" | "ogg" | "webm" | "mp4" | "flac"
    extension: str  # the upload's file name for the transcriber ends in it
    content_type: str


WAV = AudioFormat("wav", "wav", "audio/wav")
MP3 = AudioFormat("mp3", "mp3", "audio/mpeg")
OGG = AudioFormat("ogg", "ogg", "audio/ogg")
WEBM = AudioFormat("webm", "webm", "audio/webm")
MP4 = AudioFormat("mp4", "m4a", "audio/mp4")  # Whisper reads audio-only MP4 as .m4a
FLAC = AudioFormat("flac", "flac", "audio/flac")
FORMATS = (WAV, MP3, OGG, WEBM, MP4, FLAC)


@dataclass(frozen=True, slots=True)
class _Container:
    format: AudioFormat
    magic: Callable[[bytes], bool]  # the bytes start as this container does
    holds_audio: Callable[[bytes], bool]  # and what it holds is audio of a supported codec
    duration: Callable[[bytes], float | None]  # declared by the headers; raises Malformed
    measure: Callable[[bytes], float | None] | None = None  # from the media, when undeclared


# In sniffing order: the first container whose magic number the bytes carry decides. FLAC
# comes before MP3, since an ID3v2 tag may precede either; MP3, whose frame sync is the
# weakest magic number, comes last.
_CONTAINERS = (
    _Container(WAV, wav.magic, wav.holds_audio, wav.duration),
    _Container(OGG, ogg.magic, ogg.holds_audio, ogg.duration),
    _Container(FLAC, flac.magic, flac.holds_audio, flac.duration),
    _Container(WEBM, webm.magic, webm.holds_audio, webm.duration, webm.measured_duration),
    _Container(MP4, mp4.magic, mp4.holds_audio, mp4.duration),
    _Container(MP3, mp3.magic, mp3.holds_audio, mp3.duration),
)
_BY_FORMAT = {container.format: container for container in _CONTAINERS}


def sniff(data: bytes) -> AudioFormat | None:
    """The container of `data`, from its magic numbers and first headers; None when it is
    none of the supported ones. Never raises."""
    for container in _CONTAINERS:
        if container.magic(data):
            return container.format if container.holds_audio(data) else None
    return None


def read_duration(data: bytes, fmt: AudioFormat, *, measure: bool = False) -> float | None:
    """The duration `data` declares (or, for WAV and CBR MP3, implies by its length) when
    read as `fmt`; None when the container does not say. With `measure`, an undeclared
    duration is measured from the media where the format allows (WebM). Raises `Malformed`
    when the headers are broken or say something impossible."""
    container = _BY_FORMAT[fmt]
    seconds = container.duration(data)
    if seconds is None and measure and container.measure is not None:
        seconds = container.measure(data)
    if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
        raise Malformed
    return seconds


def duration_seconds(data: bytes, fmt: AudioFormat, *, measure: bool = False) -> float | None:
    """`read_duration`, with None also for broken headers. Never raises."""
    try:
        return read_duration(data, fmt, measure=measure)
    except Malformed:
        return None
