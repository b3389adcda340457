"""Ogg carrying Opus or Vorbis: the codec from the first packet; the duration from the last
page's granule position, less Opus's pre-skip."""

from __future__ import annotations

from typing import NamedTuple

from common.audio.binary import Malformed, le, u8

# An Ogg page is at most 27 + 255 + 255 * 255 = 65,307 bytes, so the last complete page
# always begins in the last 64 KiB.
_TAIL = 64 * 1024
_NO_GRANULE = 1 << 63  # -1 (no packet ends on the page) and other negative positions


class _Page(NamedTuple):
    serial: int
    granule: int
    body: int  # where the packet data starts
    lacing: bytes
    end: int


class _Codec(NamedTuple):
    rate: int  # granule positions count samples at this rate
    pre_skip: int  # samples at the start the decoder discards (Opus)


def magic(data: bytes) -> bool:
    return data.startswith(b"OggS")


def holds_audio(data: bytes) -> bool:
    """Opus or Vorbis; a stream cut before its codec is known is believed to be."""
    if len(data) > 4 and data[4] != 0:  # stream structure version, always 0
        return False
    try:
        _, codec = _codec(data)
    except Malformed:
        return True
    return codec is not None


def duration(data: bytes) -> float | None:
    """None when no page near the end has a granule position."""
    first, codec = _codec(data)
    if codec is None:
        raise Malformed
    granule = _last_granule(data, first.serial)
    if granule is None:
        return None
    return max(granule - codec.pre_skip, 0) / codec.rate


def _page(data: bytes, position: int) -> _Page:
    if data[position : position + 4] != b"OggS" or u8(data, position + 4) != 0:
        raise Malformed
    granule, serial = le(data, position + 6, 8), le(data, position + 14, 4)
    body = position + 27 + u8(data, position + 26)
    if body > len(data):
        raise Malformed
    lacing = data[position + 27 : body]
    return _Page(serial, granule, body, lacing, body + sum(lacing))


def _codec(data: bytes) -> tuple[_Page, _Codec | None]:
    """The first page and, from its first packet, the codec; None for a codec other than
    Opus and Vorbis. Both put their identification header alone on the first page."""
    page = _page(data, 0)
    length = 0
    for value in page.lacing:
        length += value
        if value < 255:
            break
    else:
        raise Malformed  # no packet, or one that continues on the next page
    packet = data[page.body : page.body + length]
    if len(packet) < length:
        raise Malformed
    if packet.startswith(b"OpusHead"):
        return page, _Codec(48000, le(packet, 10, 2))  # Opus granules are always 48 kHz
    if packet.startswith(b"\x01vorbis"):
        rate = le(packet, 12, 4)
        if rate == 0:
            raise Malformed
        return page, _Codec(rate, 0)
    return page, None


def _tail_page(data: bytes, position: int) -> _Page | None:
    try:
        return _page(data, position)
    except Malformed:
        return None


def _last_granule(data: bytes, serial: int) -> int | None:
    """The granule position of the last complete page of the stream `serial` that has one,
    searched backwards in the last 64 KiB."""
    floor, end = max(0, len(data) - _TAIL), len(data)
    while True:
        position = data.rfind(b"OggS", floor, end)
        if position < 0:
            return None
        end = position + 3  # the next search may find a pattern starting one byte earlier
        page = _tail_page(data, position)
        if page is not None and page.serial == serial and page.end <= len(data) and page.granule < _NO_GRANULE:
            return page.granule
