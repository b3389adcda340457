"""WebM and Matroska (EBML): the DocType from the EBML header; the duration from Segment >
Info > Duration, which browsers' MediaRecorder does not write, or else measured from the
Clusters' and blocks' timestamps."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

from common.audio.binary import Malformed, be, u8

_MAGIC = b"\x1a\x45\xdf\xa3"
_EBML = 0x1A45DFA3
_DOC_TYPE = 0x4282
_SEGMENT = 0x18538067
_INFO = 0x1549A966
_TRACKS = 0x1654AE6B
_CLUSTER = 0x1F43B675
_TIMECODE_SCALE = 0x2AD7B1
_DURATION = 0x4489
_TIMECODE = 0xE7  # a Cluster's, in ticks
_SIMPLE_BLOCK = 0xA3
_BLOCK_GROUP = 0xA0
_BLOCK = 0xA1
_BLOCK_DURATION = 0x9B
_VOID = 0xEC
_CRC32 = 0xBF
_DOC_TYPES = (b"webm", b"matroska")  # one demuxer reads both
_MAX_ELEMENTS = 4096
# Measuring walks every block: 500,000 of 20 ms Opus packets play for close to three hours,
# beyond any upload a transcriber takes (Groq's 25 MB hold about 100,000 at 128 kbit/s).
_MAX_MEASURED_ELEMENTS = 500_000


class _Segment(NamedTuple):
    scale: int  # ns a tick
    duration: float | None  # ticks, from Info
    clusters: int  # where the first Cluster starts
    end: int  # where the Segment ends, clipped to the data


def magic(data: bytes) -> bool:
    return data.startswith(_MAGIC)


def holds_audio(data: bytes) -> bool:
    """A DocType this demuxer reads; the magic number then a header cut short or broken is
    believed to be one."""
    try:
        doc_type, _ = _header(data)
    except Malformed:
        return True
    return doc_type in _DOC_TYPES


def duration(data: bytes) -> float | None:
    """Raises unless the file has a Segment with Tracks and a first Cluster (some audio);
    None when Info has no Duration, as in MediaRecorder's output."""
    segment = _segment(data)
    return None if segment.duration is None else segment.duration * segment.scale / 1e9


def measured_duration(data: bytes) -> float | None:
    """Where the last complete block ends: its Cluster's timestamp plus its own, plus its
    BlockDuration when it has one (a SimpleBlock never does, so the result is short by the
    last packet's length). None when the file holds no block. The walk goes through every
    Cluster, of known or unknown size alike, and stops where the data is cut short."""
    segment = _segment(data)
    cluster_time = 0
    last_end: int | None = None
    position = segment.clusters
    for _ in range(_MAX_MEASURED_ELEMENTS):
        if position >= segment.end:
            break
        try:
            element_id, size, body = _element(data, position)
        except Malformed:
            break  # cut short inside an element header
        if element_id == _CLUSTER:
            cluster_time, position = 0, body  # its children follow: Timecode first, then blocks
            continue
        if size is None or body + size > len(data):
            break  # an element that cannot be skipped, or one cut short
        block_end: int | None = None
        if element_id == _TIMECODE:
            cluster_time = _unsigned(data, body, size)
        elif element_id == _SIMPLE_BLOCK:
            block_end = cluster_time + _block_time(data, body, size)
        elif element_id == _BLOCK_GROUP:
            block_end = _group_end(data, body, body + size, cluster_time)
        if block_end is not None:
            last_end = block_end if last_end is None else max(last_end, block_end)
        position = body + size
    else:
        raise Malformed
    return None if last_end is None else last_end * segment.scale / 1e9


def _element(data: bytes, position: int) -> tuple[int, int | None, int]:
    """(id, size or None when unknown, where the content starts) of the element at `position`."""
    first = u8(data, position)
    id_length = 9 - first.bit_length()  # the position of the first set bit tells the length
    if first == 0 or id_length > 4:
        raise Malformed
    element_id = be(data, position, id_length)
    position += id_length
    first = u8(data, position)
    if first == 0:
        raise Malformed
    size_length = 9 - first.bit_length()
    value_bits = 7 * size_length
    size = be(data, position, size_length) & ((1 << value_bits) - 1)
    # All value bits set means "unknown size": MediaRecorder streams its Segment and Clusters so.
    return element_id, None if size == (1 << value_bits) - 1 else size, position + size_length


def _children(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(id, size, content start) of each element in [start, end), which must be complete."""
    position = start
    for _ in range(_MAX_ELEMENTS):
        if position >= end:
            return
        element_id, size, body = _element(data, position)
        if size is None or body + size > end:
            raise Malformed
        yield element_id, size, body
        position = body + size
    raise Malformed


def _unsigned(data: bytes, body: int, size: int) -> int:
    if size > 8:
        raise Malformed
    return be(data, body, size)


def _header(data: bytes) -> tuple[bytes, int]:
    """The DocType and where the EBML header ends."""
    element_id, size, body = _element(data, 0)
    if element_id != _EBML or size is None or body + size > len(data):
        raise Malformed
    doc_type = b"matroska"  # the default when the header names none
    for child_id, child_size, child_body in _children(data, body, body + size):
        if child_id == _DOC_TYPE:
            doc_type = data[child_body : child_body + child_size].rstrip(b"\x00")
    return doc_type, body + size


def _segment_start(data: bytes, position: int) -> tuple[int | None, int]:
    """(size, content start) of the Segment, skipping the Void and CRC elements EBML allows
    before it."""
    for _ in range(_MAX_ELEMENTS):
        element_id, size, body = _element(data, position)
        if element_id == _SEGMENT:
            return size, body
        if element_id not in (_VOID, _CRC32) or size is None:
            raise Malformed
        position = body + size
    raise Malformed


def _info(data: bytes, start: int, end: int) -> tuple[int, float | None]:
    """TimecodeScale (ns a tick) and Duration (in ticks, when present) of an Info element."""
    scale, duration = 1_000_000, None
    for element_id, size, body in _children(data, start, end):
        if element_id == _TIMECODE_SCALE:
            if not 1 <= size <= 8:
                raise Malformed
            scale = be(data, body, size)
            if scale == 0:
                raise Malformed
        elif element_id == _DURATION:
            if size == 0:
                duration = 0.0
            elif size in (4, 8):
                (duration,) = struct.unpack(">f" if size == 4 else ">d", data[body : body + size])
            else:
                raise Malformed
    return scale, duration


def _segment(data: bytes) -> _Segment:
    """The Segment up to its first Cluster; raises unless Tracks come before that Cluster."""
    doc_type, position = _header(data)
    if doc_type not in _DOC_TYPES:
        raise Malformed
    size, position = _segment_start(data, position)
    segment_end = len(data) if size is None else min(position + size, len(data))
    scale, duration = 1_000_000, None
    has_tracks = False
    for _ in range(_MAX_ELEMENTS):
        if position >= segment_end:
            break
        try:
            element_id, size, body = _element(data, position)
        except Malformed:
            break  # cut short inside an element header
        if element_id == _CLUSTER:
            if not has_tracks:
                break
            return _Segment(scale, duration, position, segment_end)
        if size is None or body + size > len(data):
            break  # an element that cannot be skipped, or one cut short
        if element_id == _INFO:
            scale, duration = _info(data, body, body + size)
        elif element_id == _TRACKS:
            has_tracks = True
        position = body + size
    raise Malformed


def _block_time(data: bytes, body: int, size: int) -> int:
    """A block's timestamp relative to its Cluster's: a signed 16-bit integer after the
    track number (an EBML variable-length integer)."""
    first = u8(data, body)
    track_length = 9 - first.bit_length()
    if first == 0 or track_length + 2 > size:
        raise Malformed
    relative = be(data, body + track_length, 2)
    return relative - 0x10000 if relative & 0x8000 else relative


def _group_end(data: bytes, start: int, end: int, cluster_time: int) -> int | None:
    """Where a BlockGroup's Block ends: its timestamp plus its BlockDuration (0 when absent)."""
    time: int | None = None
    length = 0
    for element_id, size, body in _children(data, start, end):
        if element_id == _BLOCK:
            time = cluster_time + _block_time(data, body, size)
        elif element_id == _BLOCK_DURATION:
            length = _unsigned(data, body, size)
    return None if time is None else time + length
