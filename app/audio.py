"""What a voice upload is, told by its bytes, and how long it lasts, told by its headers.

Browsers label recordings loosely (a `blob` of `audio/webm;codecs=opus`, Safari's
`audio/mp4`, a WAV sent as `application/octet-stream`), and the transcriber (Groq Whisper)
picks its decoder by the file name's extension. So the name sent on comes from the bytes,
never from the client's file name or content type. The duration lets the app refuse a
recording that is too long before it pays for a transcription.

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
stream), so the work does not grow with hostile input. Reads past the end or values that
contradict the format raise the private `_Malformed`, which the public functions turn into
`None` or into `AudioRejected("audio_undecodable")`: arbitrary bytes never raise anything
else.

A container recognised but holding something that is surely not supported audio (an Ogg
stream of another codec, an EBML file of another DocType, a HEIF image in an ISO box
structure) is "unsupported"; a recognised container whose insides cannot be read (cut
short, contradictory) is "undecodable".
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, NamedTuple


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


def sniff(data: bytes) -> AudioFormat | None:
    """The container of `data`, from its magic numbers and first headers; None when it is
    none of the supported ones. Never raises."""
    try:
        return _sniff(data)
    except _Malformed:
        return None


def duration_seconds(data: bytes, fmt: AudioFormat) -> float | None:
    """The duration `data` declares (or, for WAV and CBR MP3, implies by its length) when
    read as `fmt`; None when the container does not say and it cannot be computed cheaply,
    or when the headers are broken. Never raises."""
    try:
        return _read_duration(data, fmt)
    except _Malformed:
        return None


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
        seconds = _read_duration(data, fmt)
    except _Malformed:
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


# -- reading bytes ------------------------------------------------------------------------------


class _Malformed(Exception):
    """The bytes end early or contradict their format."""


def _uint(data: bytes, offset: int, size: int, order: Literal["big", "little"]) -> int:
    if offset < 0 or offset + size > len(data):
        raise _Malformed
    return int.from_bytes(data[offset : offset + size], order)


def _be(data: bytes, offset: int, size: int) -> int:
    return _uint(data, offset, size, "big")


def _le(data: bytes, offset: int, size: int) -> int:
    return _uint(data, offset, size, "little")


def _u8(data: bytes, offset: int) -> int:
    return _uint(data, offset, 1, "big")


def _sniff(data: bytes) -> AudioFormat | None:
    if data.startswith(b"RIFF"):
        return WAV if data[8:12] == b"WAVE" else None
    if data.startswith(b"OggS"):
        return _sniff_ogg(data)
    if data.startswith(b"fLaC"):
        return FLAC
    if data.startswith(_EBML_MAGIC):
        return _sniff_webm(data)
    if data[4:8] == b"ftyp":
        return None if data[8:12] in _NOT_AUDIO_BRANDS else MP4
    if data.startswith(b"ID3"):
        return _sniff_id3(data)
    frame = _mpeg_frame(data, 0)
    return MP3 if frame is not None and _mpeg_confirmed(data, 0, frame) else None


def _read_duration(data: bytes, fmt: AudioFormat) -> float | None:
    reader = _DURATION_READERS.get(fmt.name)
    seconds = reader(data) if reader is not None else None
    if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
        raise _Malformed
    return seconds


# -- WAV ----------------------------------------------------------------------------------------

_MAX_RIFF_CHUNKS = 1024
_STREAMING_SIZES = (0, 0xFFFFFFFF)  # written by recorders that never seek back to fix the size


def _wav_duration(data: bytes) -> float | None:
    if not data.startswith(b"RIFF") or data[8:12] != b"WAVE":
        raise _Malformed
    byte_rate: int | None = None
    audio_bytes: int | None = None
    position = 12
    for _ in range(_MAX_RIFF_CHUNKS):
        if position + 8 > len(data) or (byte_rate is not None and audio_bytes is not None):
            break
        chunk_id, size, body = data[position : position + 4], _le(data, position + 4, 4), position + 8
        if chunk_id == b"fmt ":
            if size < 16:
                raise _Malformed
            byte_rate = _le(data, body + 8, 4)
        elif chunk_id == b"data":
            available = len(data) - body
            if size in _STREAMING_SIZES or size > available:  # unknown, or the upload is cut short
                audio_bytes = available
                break  # nothing known follows
            audio_bytes = size
        position = body + size + (size & 1)  # chunks are padded to an even length
    if byte_rate is None or audio_bytes is None or byte_rate == 0:
        raise _Malformed
    return audio_bytes / byte_rate


# -- MP3 ----------------------------------------------------------------------------------------

_MAX_ID3_TAGS = 4  # some taggers prepend a second tag instead of rewriting the first
# Some files have padding or junk between the tag and the first frame; beyond this much, give up.
_MPEG_SEARCH_WINDOW = 16 * 1024

# kbit/s by (MPEG-1?, layer), index 0 ("free format") and 15 (forbidden) excluded below.
_MPEG_BITRATES = {
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
# Hz by the two version bits: 11 MPEG-1, 10 MPEG-2, 00 MPEG-2.5 (01 is reserved).
_MPEG_RATES = {0b11: (44100, 48000, 32000), 0b10: (22050, 24000, 16000), 0b00: (11025, 12000, 8000)}
# Layer III side information, by (MPEG-1?, mono?); a Xing header follows it.
_SIDE_INFO_BYTES = {(True, True): 17, (True, False): 32, (False, True): 9, (False, False): 17}


class _MpegFrame(NamedTuple):
    mpeg1: bool
    layer: int
    bitrate: int  # bit/s
    sample_rate: int
    samples: int  # per frame
    length: int  # bytes, header included
    mono: bool


def _mpeg_frame(data: bytes, position: int) -> _MpegFrame | None:
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
    bitrate = _MPEG_BITRATES[(mpeg1, layer)][bitrate_index] * 1000
    sample_rate = _MPEG_RATES[version][rate_index]
    if layer == 1:
        samples, length = 384, (12 * bitrate // sample_rate + padding) * 4
    else:
        samples = 1152 if mpeg1 or layer == 2 else 576
        length = samples // 8 * bitrate // sample_rate + padding
    return _MpegFrame(mpeg1, layer, bitrate, sample_rate, samples, length, fourth >> 6 == 3)


def _mpeg_confirmed(data: bytes, position: int, frame: _MpegFrame, *, expected: bool = True) -> bool:
    """Whether the next frame is where `frame` says and alike: two bytes 0xFF 0xFx are common
    in any binary, two consistent frame headers a frame apart are not. A frame that ends
    the data (a one-frame file, or a cut upload) cannot be checked; it is believed only where
    a frame was `expected` (at the start, or right after the tag), not one found by a scan."""
    following = position + frame.length
    if following + 4 > len(data) or data[following : following + 3] == b"TAG":
        return expected
    other = _mpeg_frame(data, following)
    return (
        other is not None
        and other.mpeg1 == frame.mpeg1
        and other.layer == frame.layer
        and other.sample_rate == frame.sample_rate
    )


def _skip_id3v2(data: bytes) -> int:
    """Where the data after the leading ID3v2 tags (if any) begins; may be past the end."""
    position = 0
    for _ in range(_MAX_ID3_TAGS):
        if data[position : position + 3] != b"ID3":
            break
        header = data[position : position + 10]
        if len(header) < 10:
            raise _Malformed
        major, minor, flags, size = header[3], header[4], header[5], header[6:10]
        if major not in (2, 3, 4) or minor == 0xFF or any(byte & 0x80 for byte in size):
            raise _Malformed
        # A synchsafe integer: 7 bits a byte, so that no 0xFF 0xEx can mimic a frame sync.
        length = (size[0] << 21) | (size[1] << 14) | (size[2] << 7) | size[3]
        footer = 10 if major == 4 and flags & 0x10 else 0
        position += 10 + length + footer
    return position


def _sniff_id3(data: bytes) -> AudioFormat | None:
    """ID3v2 is MP3's tag, though some FLAC files carry one too. A tag that is cut short still
    says MP3 (the duration reader will find it undecodable); a malformed one says nothing."""
    try:
        start = _skip_id3v2(data)
    except _Malformed:
        return MP3 if len(data) < 10 else None
    return FLAC if data[start : start + 4] == b"fLaC" else MP3


def _find_mpeg_frame(data: bytes, start: int) -> tuple[int, _MpegFrame] | None:
    stop = min(len(data) - 3, start + _MPEG_SEARCH_WINDOW)
    position = start
    while position < stop:
        position = data.find(b"\xff", position, stop)
        if position < 0:
            return None
        frame = _mpeg_frame(data, position)
        if frame is not None and _mpeg_confirmed(data, position, frame, expected=position == start):
            return position, frame
        position += 1
    return None


def _xing_frames(data: bytes, position: int, frame: _MpegFrame) -> int | None:
    """The frame count of a Xing (VBR) or Info (CBR, by LAME) header in the first frame."""
    side_info = _SIDE_INFO_BYTES[(frame.mpeg1, frame.mono)]
    for offset in (4 + side_info, 6 + side_info):  # after a 16-bit CRC, if the writer counted one
        tag = position + offset
        if data[tag : tag + 4] in (b"Xing", b"Info"):
            flags = _be(data, tag + 4, 4)
            return _be(data, tag + 8, 4) if flags & 1 else None
    return None


def _vbri_frames(data: bytes, position: int) -> int | None:
    """The frame count of a Fraunhofer VBRI header, always 32 bytes after the frame header."""
    tag = position + 36
    if data[tag : tag + 4] != b"VBRI":
        return None
    return _be(data, tag + 14, 4)


def _mp3_duration(data: bytes) -> float | None:
    found = _find_mpeg_frame(data, _skip_id3v2(data))
    if found is None:
        raise _Malformed
    position, frame = found
    frames = _xing_frames(data, position, frame) or _vbri_frames(data, position)
    if frames:
        return frames * frame.samples / frame.sample_rate
    # No frame count: assume a constant bit rate over the bytes after the first frame's start.
    end = len(data)
    if end - 128 >= position and data[end - 128 : end - 125] == b"TAG":  # ID3v1 at the very end
        end -= 128
    return (end - position) * 8 / frame.bitrate


# -- FLAC ---------------------------------------------------------------------------------------


def _flac_duration(data: bytes) -> float | None:
    start = _skip_id3v2(data)
    if data[start : start + 4] != b"fLaC":
        raise _Malformed
    block_type, block_length = _u8(data, start + 4) & 0x7F, _be(data, start + 5, 3)
    if block_type != 0 or block_length < 34 or start + 8 + 34 > len(data):  # STREAMINFO comes first
        raise _Malformed
    # 20 bits sample rate, 3 channels, 5 bits per sample, 36 total samples (0 = unknown).
    fields = _be(data, start + 8 + 10, 8)
    sample_rate, total_samples = fields >> 44, fields & ((1 << 36) - 1)
    if sample_rate == 0:
        raise _Malformed
    return total_samples / sample_rate if total_samples else None


# -- Ogg ----------------------------------------------------------------------------------------

# An Ogg page is at most 27 + 255 + 255 * 255 = 65,307 bytes, so the last complete page
# always begins in the last 64 KiB.
_OGG_TAIL = 64 * 1024
_NO_GRANULE = 1 << 63  # -1 (no packet ends on the page) and other negative positions


class _OggPage(NamedTuple):
    serial: int
    granule: int
    body: int  # where the packet data starts
    lacing: bytes
    end: int


class _OggCodec(NamedTuple):
    rate: int  # granule positions count samples at this rate
    pre_skip: int  # samples at the start the decoder discards (Opus)


def _ogg_page(data: bytes, position: int) -> _OggPage:
    if data[position : position + 4] != b"OggS" or _u8(data, position + 4) != 0:
        raise _Malformed
    granule, serial = _le(data, position + 6, 8), _le(data, position + 14, 4)
    body = position + 27 + _u8(data, position + 26)
    if body > len(data):
        raise _Malformed
    lacing = data[position + 27 : body]
    return _OggPage(serial, granule, body, lacing, body + sum(lacing))


def _ogg_codec(data: bytes) -> tuple[_OggPage, _OggCodec | None]:
    """The first page and, from its first packet, the codec; None for a codec other than
    Opus and Vorbis. Both put their identification header alone on the first page."""
    page = _ogg_page(data, 0)
    length = 0
    for value in page.lacing:
        length += value
        if value < 255:
            break
    else:
        raise _Malformed  # no packet, or one that continues on the next page
    packet = data[page.body : page.body + length]
    if len(packet) < length:
        raise _Malformed
    if packet.startswith(b"OpusHead"):
        return page, _OggCodec(48000, _le(packet, 10, 2))  # Opus granules are always 48 kHz
    if packet.startswith(b"\x01vorbis"):
        rate = _le(packet, 12, 4)
        if rate == 0:
            raise _Malformed
        return page, _OggCodec(rate, 0)
    return page, None


def _sniff_ogg(data: bytes) -> AudioFormat | None:
    if len(data) > 4 and data[4] != 0:  # stream structure version, always 0
        return None
    try:
        _, codec = _ogg_codec(data)
    except _Malformed:
        return OGG  # an Ogg stream cut before its codec is known
    return OGG if codec is not None else None


def _ogg_tail_page(data: bytes, position: int) -> _OggPage | None:
    try:
        return _ogg_page(data, position)
    except _Malformed:
        return None


def _last_granule(data: bytes, serial: int) -> int | None:
    """The granule position of the last complete page of the stream `serial` that has one,
    searched backwards in the last 64 KiB."""
    floor, end = max(0, len(data) - _OGG_TAIL), len(data)
    while True:
        position = data.rfind(b"OggS", floor, end)
        if position < 0:
            return None
        end = position + 3  # the next search may find a pattern starting one byte earlier
        page = _ogg_tail_page(data, position)
        if page is not None and page.serial == serial and page.end <= len(data) and page.granule < _NO_GRANULE:
            return page.granule


def _ogg_duration(data: bytes) -> float | None:
    first, codec = _ogg_codec(data)
    if codec is None:
        raise _Malformed
    granule = _last_granule(data, first.serial)
    if granule is None:
        return None
    return max(granule - codec.pre_skip, 0) / codec.rate


# -- WebM / Matroska (EBML) ---------------------------------------------------------------------

_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_EBML = 0x1A45DFA3
_DOC_TYPE = 0x4282
_SEGMENT = 0x18538067
_INFO = 0x1549A966
_TRACKS = 0x1654AE6B
_CLUSTER = 0x1F43B675
_TIMECODE_SCALE = 0x2AD7B1
_DURATION = 0x4489
_VOID = 0xEC
_CRC32 = 0xBF
_WEBM_DOC_TYPES = (b"webm", b"matroska")  # one demuxer reads both
_MAX_EBML_ELEMENTS = 4096


def _ebml_element(data: bytes, position: int) -> tuple[int, int | None, int]:
    """(id, size or None when unknown, where the content starts) of the element at `position`."""
    first = _u8(data, position)
    id_length = 9 - first.bit_length()  # the position of the first set bit tells the length
    if first == 0 or id_length > 4:
        raise _Malformed
    element_id = _be(data, position, id_length)
    position += id_length
    first = _u8(data, position)
    if first == 0:
        raise _Malformed
    size_length = 9 - first.bit_length()
    value_bits = 7 * size_length
    size = _be(data, position, size_length) & ((1 << value_bits) - 1)
    # All value bits set means "unknown size": MediaRecorder streams its Segment and Clusters so.
    return element_id, None if size == (1 << value_bits) - 1 else size, position + size_length


def _ebml_children(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(id, size, content start) of each element in [start, end), which must be complete."""
    position = start
    for _ in range(_MAX_EBML_ELEMENTS):
        if position >= end:
            return
        element_id, size, body = _ebml_element(data, position)
        if size is None or body + size > end:
            raise _Malformed
        yield element_id, size, body
        position = body + size
    raise _Malformed


def _ebml_header(data: bytes) -> tuple[bytes, int]:
    """The DocType and where the EBML header ends."""
    element_id, size, body = _ebml_element(data, 0)
    if element_id != _EBML or size is None or body + size > len(data):
        raise _Malformed
    doc_type = b"matroska"  # the default when the header names none
    for child_id, child_size, child_body in _ebml_children(data, body, body + size):
        if child_id == _DOC_TYPE:
            doc_type = data[child_body : child_body + child_size].rstrip(b"\x00")
    return doc_type, body + size


def _sniff_webm(data: bytes) -> AudioFormat | None:
    try:
        doc_type, _ = _ebml_header(data)
    except _Malformed:
        return WEBM  # the magic number, then a header cut short or broken
    return WEBM if doc_type in _WEBM_DOC_TYPES else None


def _webm_segment(data: bytes, position: int) -> tuple[int | None, int]:
    """(size, content start) of the Segment, skipping the Void and CRC elements EBML allows
    before it."""
    for _ in range(_MAX_EBML_ELEMENTS):
        element_id, size, body = _ebml_element(data, position)
        if element_id == _SEGMENT:
            return size, body
        if element_id not in (_VOID, _CRC32) or size is None:
            raise _Malformed
        position = body + size
    raise _Malformed


def _webm_info(data: bytes, start: int, end: int) -> tuple[int, float | None]:
    """TimecodeScale (ns a tick) and Duration (in ticks, when present) of an Info element."""
    scale, duration = 1_000_000, None
    for element_id, size, body in _ebml_children(data, start, end):
        if element_id == _TIMECODE_SCALE:
            if not 1 <= size <= 8:
                raise _Malformed
            scale = _be(data, body, size)
            if scale == 0:
                raise _Malformed
        elif element_id == _DURATION:
            if size == 0:
                duration = 0.0
            elif size in (4, 8):
                (duration,) = struct.unpack(">f" if size == 4 else ">d", data[body : body + size])
            else:
                raise _Malformed
    return scale, duration


def _webm_duration(data: bytes) -> float | None:
    """Raises unless the file has a Segment with Tracks and a first Cluster (some audio);
    None when Info has no Duration, as in MediaRecorder's output."""
    doc_type, position = _ebml_header(data)
    if doc_type not in _WEBM_DOC_TYPES:
        raise _Malformed
    size, position = _webm_segment(data, position)
    segment_end = len(data) if size is None else min(position + size, len(data))
    scale, duration = 1_000_000, None
    has_tracks = False
    for _ in range(_MAX_EBML_ELEMENTS):
        if position >= segment_end:
            break
        try:
            element_id, size, body = _ebml_element(data, position)
        except _Malformed:
            break  # cut short inside an element header
        if element_id == _CLUSTER:
            if not has_tracks:
                break
            if duration is None:
                return None
            return duration * scale / 1e9
        if size is None or body + size > len(data):
            break  # an element that cannot be skipped, or one cut short
        if element_id == _INFO:
            scale, duration = _webm_info(data, body, body + size)
        elif element_id == _TRACKS:
            has_tracks = True
        position = body + size
    raise _Malformed


# -- MP4 / M4A (ISO base media) -----------------------------------------------------------------

# The ISO box structure is shared with images; these brands are never audio.
_NOT_AUDIO_BRANDS = frozenset(
    {b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"crx "}
)
_MAX_TOP_LEVEL_BOXES = 100_000  # a fragmented file has two or three per fragment
_MAX_CHILD_BOXES = 1024
_UNKNOWN_32 = 0xFFFFFFFF
_UNKNOWN_64 = 0xFFFFFFFFFFFFFFFF
# A 4-byte unsigned typecode for summing big-endian sample durations in C, not in a loop.
_WORD: Literal["I", "L"] = "I" if array("I").itemsize == 4 else "L"


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
        size, kind, header = _be(data, position, 4), data[position + 4 : position + 8], 8
        if size == 1:  # a 64-bit size follows the type
            size, header = _be(data, position + 8, 8), 16
        elif size == 0:  # the box runs to the end of the file
            size = len(data) - position
        if size < header:
            raise _Malformed
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
            if _u8(payload, 0) == 1:  # 64-bit creation and modification times and duration
                movie.timescale, duration, unknown = _be(payload, 20, 4), _be(payload, 24, 8), _UNKNOWN_64
            else:
                movie.timescale, duration, unknown = _be(payload, 12, 4), _be(payload, 16, 4), _UNKNOWN_32
            movie.duration = 0 if duration == unknown else duration
        elif kind == b"trak":
            track = _read_track(payload)
            if track is not None:
                movie.track_timescales[track[0]] = track[1]
        elif kind == b"mvex":
            movie.fragmented = True
            for child_kind, child in _children(payload):
                if child_kind == b"mehd":
                    movie.fragment_duration = _be(child, 4, 8 if _u8(child, 0) == 1 else 4)
                elif child_kind == b"trex":
                    movie.default_durations[_be(child, 4, 4)] = _be(child, 12, 4)
    if not has_header or movie.timescale == 0:
        raise _Malformed
    return movie


def _read_track(trak: bytes) -> tuple[int, int] | None:
    """(track id from tkhd, timescale from mdia > mdhd), when both are there."""
    track_id = timescale = None
    for kind, payload in _children(trak):
        if kind == b"tkhd":
            track_id = _be(payload, 20 if _u8(payload, 0) == 1 else 12, 4)
        elif kind == b"mdia":
            for child_kind, child in _children(payload):
                if child_kind == b"mdhd":
                    timescale = _be(child, 20 if _u8(child, 0) == 1 else 12, 4)
    if track_id is None or not timescale:
        return None
    return track_id, timescale


def _run_duration(trun: bytes, default: int | None) -> int:
    """The summed sample durations of a trun box."""
    flags, count = _be(trun, 1, 3), _be(trun, 4, 4)
    start = 8 + (4 if flags & 0x1 else 0) + (4 if flags & 0x4 else 0)  # data offset, first flags
    if not flags & 0x100:  # no per-sample durations: all take the default
        if default is None:
            raise _Malformed
        return count * default
    fields = bin(flags & 0xF00).count("1")  # duration, size, flags, composition offset
    raw = trun[start : start + count * fields * 4]
    if len(raw) < count * fields * 4:
        raise _Malformed
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
                flags, track_id = _be(child, 1, 3), _be(child, 4, 4)
                if flags & 0x8:  # default-sample-duration, after the optional fields before it
                    default = _be(child, 8 + (8 if flags & 0x1 else 0) + (4 if flags & 0x2 else 0), 4)
            elif child_kind == b"tfdt":
                base = _be(child, 4, 8 if _u8(child, 0) == 1 else 4)
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


def _mp4_duration(data: bytes) -> float | None:
    """mvhd's duration; for a fragmented file (MediaRecorder's MP4), which leaves it 0, mehd's
    or else the end of the last complete fragment."""
    if data[4:8] != b"ftyp":
        raise _Malformed
    movie: _Movie | None = None
    last_fragment: _Box | None = None
    for box in _boxes(data, _MAX_TOP_LEVEL_BOXES):
        if box.kind == b"moov" and movie is None:
            if not box.complete:
                raise _Malformed  # without the whole sample tables nothing can be decoded
            movie = _read_movie(data[box.body : box.end])
            if movie.duration:
                return movie.duration / movie.timescale
            if movie.fragment_duration:
                return movie.fragment_duration / movie.timescale
        elif box.kind == b"moof" and box.complete:
            last_fragment = box
    if movie is None:
        raise _Malformed  # no moov (or one after the cut): nothing says what the media is
    if last_fragment is not None:
        return _fragment_end(data[last_fragment.body : last_fragment.end], movie)
    return None if movie.fragmented else 0.0


_DURATION_READERS: dict[str, Callable[[bytes], float | None]] = {
    WAV.name: _wav_duration,
    MP3.name: _mp3_duration,
    OGG.name: _ogg_duration,
    WEBM.name: _webm_duration,
    MP4.name: _mp4_duration,
    FLAC.name: _flac_duration,
}
