"""MP4 / M4A (ISO base media): an `ftyp` box at offset 4 whose brand is not an image's; the
duration from mvhd, else mehd, else the end of the last complete fragment (MediaRecorder's
fragmented MP4)."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from common.audio.binary import Malformed, be, u8

# The ISO box structure is shared with images; these brands are never audio.
_IMAGE_BRANDS = frozenset(
    {b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"crx "}
)
_MAX_TOP_LEVEL_BOXES = 100_000  # a fragmented file has two or three per fragment
_MAX_CHILD_BOXES = 1024
_UNKNOWN_32 = 0xFFFFFFFF
_UNKNOWN_64 = 0xFFFFFFFFFFFFFFFF
# A 4-byte unsigned typecode for summing big-endian sample durations in C, not in a loop.
_WORD: Literal["I", "L"] = "I" if array("I").itemsize == 4 else "L"


def magic(data: bytes) -> bool:
    return data[4:8] == b"ftyp"


def holds_audio(data: bytes) -> bool:
    return data[8:12] not in _IMAGE_BRANDS


def duration(data: bytes) -> float | None:
    """mvhd's duration; for a fragmented file (MediaRecorder's MP4), which leaves it 0, mehd's
    or else the end of the last complete fragment."""
    if data[4:8] != b"ftyp":
        raise Malformed
    movie: _Movie | None = None
    last_fragment: _Box | None = None
    for box in _boxes(data, _MAX_TOP_LEVEL_BOXES):
        if box.kind == b"moov" and movie is None:
            if not box.complete:
                raise Malformed  # without the whole sample tables nothing can be decoded
            movie = _read_movie(data[box.body : box.end])
            if movie.duration:
                return movie.duration / movie.timescale
            if movie.fragment_duration:
                return movie.fragment_duration / movie.timescale
        elif box.kind == b"moof" and box.complete:
            last_fragment = box
    if movie is None:
        raise Malformed  # no moov (or one after the cut): nothing says what the media is
    if last_fragment is not None:
        return _fragment_end(data[last_fragment.body : last_fragment.end], movie)
    return None if movie.fragmented else 0.0


class _Box(NamedTuple):
    kind: bytes
    body: int  # where the payload starts
    end: int  # where the payload ends, clipped to the data
    complete: bool


def _boxes(data: bytes, limit: int) -> Iterator[_Box]:
    """The boxes that follow one another from the start of `data`, up to `limit` of them. A
    box cut short is yielded, clipped and incomplete, and ends the walk."""
    position = 0
    for _ in range(limit):
        if position + 8 > len(data):
            return
        size, kind, header = be(data, position, 4), data[position + 4 : position + 8], 8
        if size == 1:  # a 64-bit size follows the type
            size, header = be(data, position + 8, 8), 16
        elif size == 0:  # the box runs to the end of the file
            size = len(data) - position
        if size < header:
            raise Malformed
        end = position + size
        yield _Box(kind, position + header, min(end, len(data)), end <= len(data))
        position = end


def _children(payload: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(type, payload) of each box in a container box's payload."""
    for child in _boxes(payload, _MAX_CHILD_BOXES):
        yield child.kind, payload[child.body : child.end]


@dataclass
class _Movie:
    timescale: int = 0
    duration: int = 0  # in timescale units; 0 when unknown, as in fragmented files
    fragmented: bool = False
    fragment_duration: int = 0  # from mehd, in timescale units; 0 when absent
    track_timescales: dict[int, int] = field(default_factory=dict)
    default_durations: dict[int, int] = field(default_factory=dict)  # from trex, by track id


def _read_movie(moov: bytes) -> _Movie:
    movie = _Movie()
    has_header = False
    for kind, payload in _children(moov):
        if kind == b"mvhd":
            has_header = True
            if u8(payload, 0) == 1:  # 64-bit creation and modification times and duration
                movie.timescale, duration, unknown = be(payload, 20, 4), be(payload, 24, 8), _UNKNOWN_64
            else:
                movie.timescale, duration, unknown = be(payload, 12, 4), be(payload, 16, 4), _UNKNOWN_32
            movie.duration = 0 if duration == unknown else duration
        elif kind == b"trak":
            track = _read_track(payload)
            if track is not None:
                movie.track_timescales[track[0]] = track[1]
        elif kind == b"mvex":
            movie.fragmented = True
            for child_kind, child in _children(payload):
                if child_kind == b"mehd":
                    movie.fragment_duration = be(child, 4, 8 if u8(child, 0) == 1 else 4)
                elif child_kind == b"trex":
                    movie.default_durations[be(child, 4, 4)] = be(child, 12, 4)
    if not has_header or movie.timescale == 0:
        raise Malformed
    return movie


def _read_track(trak: bytes) -> tuple[int, int] | None:
    """(track id from tkhd, timescale from mdia > mdhd), when both are there."""
    track_id = timescale = None
    for kind, payload in _children(trak):
        if kind == b"tkhd":
            track_id = be(payload, 20 if u8(payload, 0) == 1 else 12, 4)
        elif kind == b"mdia":
            for child_kind, child in _children(payload):
                if child_kind == b"mdhd":
                    timescale = be(child, 20 if u8(child, 0) == 1 else 12, 4)
    if track_id is None or not timescale:
        return None
    return track_id, timescale


def _run_duration(trun: bytes, default: int | None) -> int:
    """The summed sample durations of a trun box."""
    flags, count = be(trun, 1, 3), be(trun, 4, 4)
    start = 8 + (4 if flags & 0x1 else 0) + (4 if flags & 0x4 else 0)  # data offset, first flags
    if not flags & 0x100:  # no per-sample durations: all take the default
        if default is None:
            raise Malformed
        return count * default
    fields = bin(flags & 0xF00).count("1")  # duration, size, flags, composition offset
    raw = trun[start : start + count * fields * 4]
    if len(raw) < count * fields * 4:
        raise Malformed
    words = array(_WORD)
    words.frombytes(raw)
    if sys.byteorder == "little":
        words.byteswap()
    return sum(words[::fields])  # each sample's duration is its record's first field


def _fragment_end(moof: bytes, movie: _Movie) -> float | None:
    """When the fragment `moof` ends, in seconds: its decode time (tfdt) plus its samples'
    durations, the latest over its tracks. None when no track says."""
    latest: float | None = None
    for kind, traf in _children(moof):
        if kind != b"traf":
            continue
        track_id = base = default = None
        runs: list[bytes] = []
        for child_kind, child in _children(traf):
            if child_kind == b"tfhd":
                flags, track_id = be(child, 1, 3), be(child, 4, 4)
                if flags & 0x8:  # default-sample-duration, after the optional fields before it
                    default = be(child, 8 + (8 if flags & 0x1 else 0) + (4 if flags & 0x2 else 0), 4)
            elif child_kind == b"tfdt":
                base = be(child, 4, 8 if u8(child, 0) == 1 else 4)
            elif child_kind == b"trun":
                runs.append(child)
        timescale = movie.track_timescales.get(track_id or 0)
        if track_id is None or base is None or not timescale:
            continue
        if not default:  # a zero default says nothing; trex may have one
            default = movie.default_durations.get(track_id) or None
        seconds = (base + sum(_run_duration(run, default) for run in runs)) / timescale
        latest = seconds if latest is None else max(latest, seconds)
    return latest
