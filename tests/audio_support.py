"""Builders of small, valid audio files for the audio tests, written from the format
specifications rather than taken from an encoder (none is installed, and none is needed:
`common.audio` reads headers and timestamps only).

- WAV by the standard library's `wave`, of silence or of given samples, optionally
  re-labelled with a "streaming" data size;
- MP3 as MPEG audio Layer III frames of silence (a header, zero side information, zero
  padding), with an ID3v2.4 tag, a Xing or VBRI header, or an ID3v1 trailer;
- Ogg pages with their real CRC-32, carrying Opus (`OpusHead`, `OpusTags`, 20 ms silent
  packets) or Vorbis (identification, comment and setup packets, then opaque audio packets);
- WebM as EBML elements: with or without Duration, known or unknown (MediaRecorder) sizes;
- MP4 boxes: ftyp, moov (mvhd version 0 or 1, one sound track) and mdat, in either order,
  and fragmented MP4 (mvex, then moof + mdat pairs) as browsers' MediaRecorder writes it;
- FLAC: the signature, STREAMINFO and a VORBIS_COMMENT block;
- hostile inputs: 20 MiB built to make a reader walk, scan or sum as much as it can
  (tested in tests/test_audio.py, timed in bench/audio_bench.py).
"""

from __future__ import annotations

import io
import struct
import wave
from collections.abc import Iterator

# -- WAV -----------------------------------------------------------------------------------------


def wav(seconds: float, *, rate: int = 16000, channels: int = 1, sample_width: int = 2) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(sample_width)
        writer.setframerate(rate)
        writer.writeframes(bytes(round(seconds * rate) * channels * sample_width))
    return buffer.getvalue()


def pcm_wav(pcm: bytes, rate: int) -> bytes:
    """16-bit mono samples `pcm` as a WAV."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(pcm)
    return buffer.getvalue()


WAV_DATA_SIZE_OFFSET = 40  # where `wave` writes the data chunk's size: after a 16-byte fmt chunk


def with_data_size(data: bytes, size: int) -> bytes:
    """The WAV with its data chunk's size field replaced, as recorders that stream do."""
    assert data[WAV_DATA_SIZE_OFFSET - 4 : WAV_DATA_SIZE_OFFSET] == b"data"
    return data[:WAV_DATA_SIZE_OFFSET] + struct.pack("<I", size) + data[WAV_DATA_SIZE_OFFSET + 4 :]


def with_chunk_before_data(data: bytes, chunk_id: bytes, body: bytes) -> bytes:
    """The WAV with one more chunk between `fmt ` and `data` (padded to an even length)."""
    chunk = chunk_id + struct.pack("<I", len(body)) + body + (b"\x00" if len(body) % 2 else b"")
    out = data[:36] + chunk + data[36:]
    return out[:4] + struct.pack("<I", len(out) - 8) + out[8:]


# -- MP3 -----------------------------------------------------------------------------------------

# MPEG-1 Layer III, no CRC, mono, "original": 128 kbit/s at 48 kHz is 384 bytes a frame and
# 32 kbit/s is 96; each frame is 1152 samples (24 ms).
MPEG1_128K = bytes([0xFF, 0xFB, 0x94, 0xC4])
MPEG1_32K = bytes([0xFF, 0xFB, 0x14, 0xC4])
MPEG1_SAMPLES, MPEG1_RATE = 1152, 48000
# MPEG-2 Layer III, 64 kbit/s at 24 kHz, mono: 192 bytes and 576 samples (24 ms) a frame.
MPEG2_64K = bytes([0xFF, 0xF3, 0x84, 0xC4])
MPEG2_SAMPLES, MPEG2_RATE = 576, 24000

_FRAME_LENGTHS = {MPEG1_128K: 384, MPEG1_32K: 96, MPEG2_64K: 192}
_SIDE_INFO = {MPEG1_128K: 17, MPEG1_32K: 17, MPEG2_64K: 9}  # mono


def mpeg_frame(header: bytes, payload: bytes = b"") -> bytes:
    """A silent frame: side information of zeros (no Huffman data), `payload` after it (a
    Xing or VBRI header), zeros up to the frame's length."""
    length = _FRAME_LENGTHS[header]
    body = bytes(_SIDE_INFO[header]) + payload
    assert 4 + len(body) <= length
    return header + body + bytes(length - 4 - len(body))


def synchsafe(value: int) -> bytes:
    return bytes([(value >> 21) & 0x7F, (value >> 14) & 0x7F, (value >> 7) & 0x7F, value & 0x7F])


def id3v2(size: int = 1000, *, title: str = "voice note") -> bytes:
    """An ID3v2.4 tag of `size` bytes after its header: a TIT2 frame, then padding."""
    text = b"\x03" + title.encode()
    frame = b"TIT2" + synchsafe(len(text)) + b"\x00\x00" + text
    assert len(frame) <= size
    return b"ID3\x04\x00\x00" + synchsafe(size) + frame + bytes(size - len(frame))


def xing(frames: int, audio_bytes: int, tag: bytes = b"Xing") -> bytes:
    return tag + struct.pack(">III", 0x3, frames, audio_bytes)  # flags: frame count, byte count


def vbri(frames: int, audio_bytes: int) -> bytes:
    # version, delay, quality, bytes, frames, TOC entries, TOC scale, entry size, frames an entry
    return b"VBRI" + struct.pack(">HHHIIHHHH", 1, 0x0480, 75, audio_bytes, frames, 0, 1, 2, 1)


def mp3(
    frames: int,
    *,
    header: bytes = MPEG1_128K,
    tag: bytes = b"",
    vbr_header: str | None = None,
    later_frames: bytes | None = None,
    id3v1: bool = False,
) -> bytes:
    """`frames` audio frames; with `vbr_header` ("xing", "info" or "vbri") a first frame that
    holds that header and no audio. `later_frames` changes the bit rate after the first
    frame, so that a CBR estimate from the first frame would be wrong."""
    audio = mpeg_frame(header) + mpeg_frame(later_frames or header) * (frames - 1)
    if vbr_header == "xing":
        audio = mpeg_frame(header, xing(frames, len(audio))) + audio
    elif vbr_header == "info":
        audio = mpeg_frame(header, xing(frames, len(audio), b"Info")) + audio
    elif vbr_header == "vbri":
        # VBRI sits 32 bytes after the header, past the side information.
        audio = mpeg_frame(header, bytes(32 - _SIDE_INFO[header]) + vbri(frames, len(audio))) + audio
    trailer = b"TAG" + bytes(125) if id3v1 else b""
    return tag + audio + trailer


# -- Ogg -----------------------------------------------------------------------------------------


def _ogg_crc_table() -> list[int]:
    table = []
    for index in range(256):
        value = index << 24
        for _ in range(8):
            value = ((value << 1) ^ 0x04C11DB7) if value & 0x80000000 else value << 1
        table.append(value & 0xFFFFFFFF)
    return table


_OGG_CRC_TABLE = _ogg_crc_table()


def ogg_crc(data: bytes) -> int:
    """CRC-32 as Ogg computes it: polynomial 0x04C11DB7, not reflected, no initial or final XOR."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC_TABLE[(crc >> 24) ^ byte]
    return crc


def ogg_page(
    serial: int, sequence: int, granule: int, packets: list[bytes], *, first: bool = False, last: bool = False
) -> bytes:
    lacing = bytearray()
    for packet in packets:
        lacing += b"\xff" * (len(packet) // 255) + bytes([len(packet) % 255])
    assert len(lacing) <= 255
    flags = (0x02 if first else 0) | (0x04 if last else 0)
    header = b"OggS\x00" + struct.pack("<BqIII", flags, granule, serial, sequence, 0) + bytes([len(lacing)])
    page = header + bytes(lacing) + b"".join(packets)
    return page[:22] + struct.pack("<I", ogg_crc(page)) + page[26:]


OPUS_SILENCE = b"\xf8\xff\xfe"  # TOC for 20 ms CELT full band, then a silent frame
OPUS_PACKET_SAMPLES = 960  # 20 ms at 48 kHz


def opus_head(pre_skip: int = 312, input_rate: int = 48000, channels: int = 1) -> bytes:
    return b"OpusHead" + struct.pack("<BBHIhB", 1, channels, pre_skip, input_rate, 0, 0)


def ogg_opus(seconds: float, *, pre_skip: int = 312, serial: int = 0x1234ABCD) -> bytes:
    """Opus in Ogg: head and tags pages, then pages of 50 silent 20 ms packets (one second)."""
    tags = b"OpusTags" + struct.pack("<I", 4) + b"test" + struct.pack("<I", 0)
    pages = [
        ogg_page(serial, 0, 0, [opus_head(pre_skip)], first=True),
        ogg_page(serial, 1, 0, [tags]),
    ]
    total = round(seconds * 48000 / OPUS_PACKET_SAMPLES)
    written = 0
    while written < total:
        count = min(50, total - written)
        written += count
        granule = pre_skip + written * OPUS_PACKET_SAMPLES
        pages.append(ogg_page(serial, len(pages), granule, [OPUS_SILENCE] * count, last=written == total))
    return b"".join(pages)


def vorbis_identification(rate: int, channels: int = 1) -> bytes:
    # version, channels, rate, bit rate maximum / nominal / minimum, block sizes 256 and 2048, framing
    return b"\x01vorbis" + struct.pack("<IBIiiiBB", 0, channels, rate, 0, 64000, 0, 0xB8, 1)


def ogg_vorbis(seconds: float, *, rate: int = 44100, serial: int = 0x0BADCAFE) -> bytes:
    """Vorbis in Ogg: identification page, comment and setup page, then audio pages whose
    granule positions count samples (the audio packets are opaque; nothing decodes them)."""
    comment = b"\x03vorbis" + struct.pack("<I", 4) + b"test" + struct.pack("<I", 0) + b"\x01"
    setup = b"\x05vorbis" + bytes(40)  # a placeholder: only a decoder reads the codebooks
    pages = [
        ogg_page(serial, 0, 0, [vorbis_identification(rate)], first=True),
        ogg_page(serial, 1, 0, [comment, setup]),
    ]
    total = round(seconds * rate)
    samples_per_packet = 1024
    written = 0
    while written < total:
        packets: list[bytes] = []
        while written < total and len(packets) < 40:
            written = min(total, written + samples_per_packet)
            packets.append(b"\x00" + bytes(30))
        pages.append(ogg_page(serial, len(pages), written, packets, last=written == total))
    return b"".join(pages)


# -- WebM ----------------------------------------------------------------------------------------

UNKNOWN_SIZE = b"\x01\xff\xff\xff\xff\xff\xff\xff"


def ebml_size(size: int) -> bytes:
    for length in range(1, 9):
        if size < (1 << (7 * length)) - 1:  # all ones is reserved for "unknown"
            return ((1 << (7 * length)) | size).to_bytes(length, "big")
    raise ValueError(size)


def element(element_id: int, payload: bytes, *, unknown_size: bool = False) -> bytes:
    id_bytes = element_id.to_bytes((element_id.bit_length() + 7) // 8, "big")
    return id_bytes + (UNKNOWN_SIZE if unknown_size else ebml_size(len(payload))) + payload


def uint_element(element_id: int, value: int) -> bytes:
    return element(element_id, value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def float_element(element_id: int, value: float, *, width: int = 8) -> bytes:
    return element(element_id, struct.pack(">d" if width == 8 else ">f", value))


def ebml_header(doc_type: bytes = b"webm") -> bytes:
    return element(
        0x1A45DFA3,
        uint_element(0x4286, 1)  # EBMLVersion
        + uint_element(0x42F7, 1)  # EBMLReadVersion
        + uint_element(0x42F2, 4)  # EBMLMaxIDLength
        + uint_element(0x42F3, 8)  # EBMLMaxSizeLength
        + element(0x4282, doc_type)  # DocType
        + uint_element(0x4287, 4)  # DocTypeVersion
        + uint_element(0x4285, 2),  # DocTypeReadVersion
    )


def webm_info(duration: float | None, *, timecode_scale: int | None = 1_000_000, width: int = 8) -> bytes:
    payload = uint_element(0x2AD7B1, timecode_scale) if timecode_scale is not None else b""
    payload += element(0x4D80, b"Chrome") + element(0x5741, b"Chrome")  # MuxingApp, WritingApp
    if duration is not None:
        payload += float_element(0x4489, duration, width=width)
    return element(0x1549A966, payload)


def webm_tracks() -> bytes:
    audio = float_element(0xB5, 48000.0) + uint_element(0x9F, 1)  # SamplingFrequency, Channels
    entry = (
        uint_element(0xD7, 1)  # TrackNumber
        + uint_element(0x73C5, 1)  # TrackUID
        + uint_element(0x83, 2)  # TrackType: audio
        + element(0x86, b"A_OPUS")  # CodecID
        + element(0x63A2, opus_head())  # CodecPrivate
        + element(0xE1, audio)
    )
    return element(0x1654AE6B, element(0xAE, entry))


def webm_cluster(timecode_ms: int, blocks: int = 5, *, unknown_size: bool = False) -> bytes:
    payload = uint_element(0xE7, timecode_ms)  # Timecode
    for index in range(blocks):
        # SimpleBlock: track 1, relative timecode, keyframe flag, an Opus packet
        payload += element(0xA3, b"\x81" + struct.pack(">hB", index * 20, 0x80) + OPUS_SILENCE)
    return element(0x1F43B675, payload, unknown_size=unknown_size)


def webm(
    duration_ms: float | None,
    *,
    doc_type: bytes = b"webm",
    timecode_scale: int | None = 1_000_000,
    unknown_sizes: bool = False,
    width: int = 8,
    void_before_info: bool = False,
    clusters: int = 3,
) -> bytes:
    """A WebM file. `unknown_sizes` with `duration_ms=None` is MediaRecorder's output:
    a Segment and Clusters of unknown size and an Info without Duration. The Duration is
    written in ticks of `timecode_scale` ns, so it is `duration_ms` converted."""
    ticks = None
    if duration_ms is not None:
        ticks = duration_ms * 1_000_000 / (timecode_scale or 1_000_000)
    body = element(0xEC, bytes(16)) if void_before_info else b""
    body += webm_info(ticks, timecode_scale=timecode_scale, width=width) + webm_tracks()
    for index in range(clusters):
        body += webm_cluster(index * 100, unknown_size=unknown_sizes)
    return ebml_header(doc_type) + element(0x18538067, body, unknown_size=unknown_sizes)


# -- MP4 -----------------------------------------------------------------------------------------


def box(kind: bytes, *parts: bytes, large: bool = False) -> bytes:
    payload = b"".join(parts)
    if large:
        return struct.pack(">I", 1) + kind + struct.pack(">Q", len(payload) + 16) + payload
    return struct.pack(">I", len(payload) + 8) + kind + payload


def full_box(kind: bytes, version: int, flags: int, *parts: bytes) -> bytes:
    return box(kind, bytes([version]) + flags.to_bytes(3, "big"), *parts)


_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


def mvhd(timescale: int, duration: int, *, version: int = 0) -> bytes:
    times = struct.pack(">QQIQ" if version else ">IIII", 0, 0, timescale, duration)
    rest = struct.pack(">IH10x", 0x10000, 0x100) + _MATRIX + bytes(24) + struct.pack(">I", 2)
    return full_box(b"mvhd", version, 0, times, rest)


def tkhd(track_id: int, duration: int, *, version: int = 0) -> bytes:
    times = struct.pack(">QQII" if version else ">IIII", 0, 0, track_id, 0)
    width = 8 if version else 4
    rest = duration.to_bytes(width, "big") + bytes(8) + struct.pack(">hhhH", 0, 0, 0x100, 0)
    return full_box(b"tkhd", version, 0x3, times, rest, _MATRIX, bytes(8))


def mdhd(timescale: int, duration: int, *, version: int = 0) -> bytes:
    times = struct.pack(">QQIQ" if version else ">IIII", 0, 0, timescale, duration)
    return full_box(b"mdhd", version, 0, times, struct.pack(">HH", 0x55C4, 0))  # language "und"


def sound_track(track_id: int, timescale: int, duration: int, *, version: int = 0) -> bytes:
    hdlr = full_box(b"hdlr", 0, 0, bytes(4), b"soun", bytes(12), b"SoundHandler\x00")
    dinf = box(b"dinf", full_box(b"dref", 0, 0, struct.pack(">I", 1), full_box(b"url ", 0, 1)))
    mp4a = box(b"mp4a", bytes(6), struct.pack(">H", 1), bytes(8), struct.pack(">HHHHI", 1, 16, 0, 0, 48000 << 16))
    stbl = box(
        b"stbl",
        full_box(b"stsd", 0, 0, struct.pack(">I", 1), mp4a),
        full_box(b"stts", 0, 0, struct.pack(">I", 0)),
        full_box(b"stsc", 0, 0, struct.pack(">I", 0)),
        full_box(b"stsz", 0, 0, struct.pack(">II", 0, 0)),
        full_box(b"stco", 0, 0, struct.pack(">I", 0)),
    )
    minf = box(b"minf", full_box(b"smhd", 0, 0, bytes(4)), dinf, stbl)
    media = box(b"mdia", mdhd(timescale, duration, version=version), hdlr, minf)
    return box(b"trak", tkhd(track_id, duration, version=version), media)


def ftyp(brand: bytes = b"M4A ", compatible: tuple[bytes, ...] = (b"M4A ", b"isom", b"mp42")) -> bytes:
    return box(b"ftyp", brand, struct.pack(">I", 0), *compatible)


def mp4(
    seconds: float,
    *,
    version: int = 0,
    moov_first: bool = True,
    timescale: int = 1000,
    media_timescale: int = 48000,
    mdat_bytes: int = 2000,
    large_mdat: bool = False,
    brand: bytes = b"M4A ",
) -> bytes:
    """An M4A: ftyp, then moov (mvhd of `version`) and mdat in the order asked."""
    moov = box(
        b"moov",
        mvhd(timescale, round(seconds * timescale), version=version),
        sound_track(1, media_timescale, round(seconds * media_timescale), version=version),
    )
    mdat = box(b"mdat", bytes(mdat_bytes), large=large_mdat)
    return ftyp(brand) + (moov + mdat if moov_first else mdat + moov)


def fragmented_mp4(
    fragments: int,
    *,
    samples: int = 50,
    sample_duration: int = 960,
    timescale: int = 48000,
    per_sample_durations: bool = True,
    default_in: str = "trex",
    mehd_duration: int | None = None,
) -> bytes:
    """MediaRecorder-style fragmented MP4: an empty moov (mvhd duration 0) with mvex, then
    `fragments` moof + mdat pairs of `samples` samples each. Durations are per sample in
    trun, or (`per_sample_durations=False`) a default in `trex` or in each `tfhd`."""
    mvex_parts = []
    if mehd_duration is not None:
        mvex_parts.append(full_box(b"mehd", 0, 0, struct.pack(">I", mehd_duration)))
    trex_default = sample_duration if default_in == "trex" else 0
    mvex_parts.append(full_box(b"trex", 0, 0, struct.pack(">IIIII", 1, 1, trex_default, 0, 0)))
    moov = box(b"moov", mvhd(1000, 0), sound_track(1, timescale, 0), box(b"mvex", *mvex_parts))
    out = ftyp(b"iso6", (b"iso6", b"mp41")) + moov
    for index in range(fragments):
        tfhd_flags = 0x020000  # default-base-is-moof
        tfhd_fields = struct.pack(">I", 1)
        if not per_sample_durations and default_in == "tfhd":
            tfhd_flags |= 0x08
            tfhd_fields += struct.pack(">I", sample_duration)
        trun_flags = 0x000001 | 0x000200 | (0x000100 if per_sample_durations else 0)
        records = b"".join(
            (struct.pack(">I", sample_duration) if per_sample_durations else b"") + struct.pack(">I", 3)
            for _ in range(samples)
        )
        traf = box(
            b"traf",
            full_box(b"tfhd", 0, tfhd_flags, tfhd_fields),
            full_box(b"tfdt", 1, 0, struct.pack(">Q", index * samples * sample_duration)),
            full_box(b"trun", 0, trun_flags, struct.pack(">Ii", samples, 0), records),
        )
        out += box(b"moof", full_box(b"mfhd", 0, 0, struct.pack(">I", index + 1)), traf)
        out += box(b"mdat", OPUS_SILENCE * samples)
    return out


# -- FLAC ----------------------------------------------------------------------------------------


def streaminfo(rate: int, total_samples: int, *, channels: int = 1, bits: int = 16) -> bytes:
    fields = (rate << 44) | ((channels - 1) << 41) | ((bits - 1) << 36) | total_samples
    return struct.pack(">HH", 4096, 4096) + bytes(6) + fields.to_bytes(8, "big") + bytes(16)


def flac(total_samples: int, *, rate: int = 16000, tag: bytes = b"", first_block_type: int = 0) -> bytes:
    """fLaC, STREAMINFO, a VORBIS_COMMENT (last block), then a few bytes standing for frames."""
    info = streaminfo(rate, total_samples)
    comment = struct.pack("<I", 4) + b"test" + struct.pack("<I", 0)
    blocks = bytes([first_block_type]) + len(info).to_bytes(3, "big") + info
    blocks += bytes([0x80 | 4]) + len(comment).to_bytes(3, "big") + comment
    return tag + b"fLaC" + blocks + b"\xff\xf8\x69\x08\x00" + bytes(64)


# -- hostile inputs -------------------------------------------------------------------------------

HOSTILE_SIZE = 20 * 1024 * 1024


def hostile_inputs() -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each hostile input, built one at a time (each is about 20 MiB)."""
    size = HOSTILE_SIZE
    yield "0xff", b"\xff" * size
    yield "mp4-tiny-boxes", ftyp() + (struct.pack(">I", 8) + b"free") * (size // 8)
    yield "mp4-tiny-fragments", fragmented_mp4(1) + (struct.pack(">I", 8) + b"moof") * (size // 8)
    yield "mp4-huge-fragment", fragmented_mp4(1, samples=size // 8)
    yield "id3-then-false-syncs", id3v2() + (MPEG1_128K + b"\x00") * (size // 5)
    yield "ogg-then-capture-patterns", ogg_opus(1.0)[:200] + b"OggS" * (size // 4)
    yield "wav-tiny-chunks", wav(0.1)[:36] + (b"LIST" + bytes(4)) * (size // 8)
    yield "webm-voids", ebml_header() + b"\x18\x53\x80\x67\x01" + b"\xff" * 7 + b"\xec\x80" * (size // 2)
    yield "mp3-long-cbr", mp3(size // 384)
