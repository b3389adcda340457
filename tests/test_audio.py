"""Voice uploads: the container told by the bytes, the duration told by the headers (or
measured, for WebM without one), and every refusal (`AudioRejected`) with its stable code.

The files are built in `tests.audio_support` from the format specifications. Besides
exact formats and durations, the tests cut every file at every length near its headers
(and at a stride beyond), and let hypothesis throw arbitrary and mutated bytes at the three
public functions: only `AudioRejected` may ever come out of them.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.audio import AudioRejected, inspect_upload
from common.audio import (
    FLAC,
    FORMATS,
    MP3,
    MP4,
    OGG,
    WAV,
    WEBM,
    AudioFormat,
    duration_seconds,
    sniff,
)
from tests.audio_support import (
    HOSTILE_SIZE,
    MPEG1_32K,
    MPEG1_128K,
    MPEG1_RATE,
    MPEG1_SAMPLES,
    MPEG2_64K,
    OPUS_SILENCE,
    box,
    ebml_header,
    element,
    flac,
    fragmented_mp4,
    ftyp,
    full_box,
    hostile_inputs,
    id3v2,
    mp3,
    mp4,
    mvhd,
    ogg_crc,
    ogg_opus,
    ogg_page,
    ogg_vorbis,
    opus_head,
    uint_element,
    vorbis_identification,
    wav,
    webm,
    webm_cluster,
    webm_info,
    webm_tracks,
    with_chunk_before_data,
    with_data_size,
)

CODES = {"audio_empty", "audio_too_large", "audio_unsupported", "audio_undecodable", "audio_too_long"}
GROQ_EXTENSIONS = {"flac", "mp3", "mp4", "mpeg", "mpga", "m4a", "ogg", "opus", "wav", "webm"}
MiB = 1024 * 1024
# Hypothesis keeps no example database: the repository ignores no `.hypothesis/` directory.
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Case:
    id: str
    data: bytes
    fmt: AudioFormat
    seconds: float | None


def _webm_with_info(info: bytes, *, tracks: bool = True, clusters: bool = True) -> bytes:
    body = info + (webm_tracks() if tracks else b"") + (webm_cluster(0) if clusters else b"")
    return ebml_header() + element(0x18538067, body)


def _cases() -> list[Case]:
    mp3_vbr = mp3(100, vbr_header="xing", later_frames=MPEG1_32K)
    return [
        Case("wav-16k-mono", wav(2.5), WAV, 2.5),
        Case("wav-44k-stereo-8bit", wav(1.0, rate=44100, channels=2, sample_width=1), WAV, 1.0),
        Case("wav-streaming-size-ffffffff", with_data_size(wav(2.0), 0xFFFFFFFF), WAV, 2.0),
        Case("wav-streaming-size-0", with_data_size(wav(2.0), 0), WAV, 2.0),
        Case("wav-odd-list-chunk", with_chunk_before_data(wav(1.5), b"LIST", b"INFOabc"), WAV, 1.5),
        Case("mp3-cbr", mp3(50), MP3, 1.2),
        Case("mp3-cbr-id3v2", mp3(50, tag=id3v2()), MP3, 1.2),
        Case("mp3-cbr-id3v1-trailer", mp3(50, id3v1=True), MP3, 1.2),
        Case("mp3-two-id3v2-tags", mp3(50, tag=id3v2(300) + id3v2(200)), MP3, 1.2),
        Case("mp3-zeros-after-tag", mp3(50, tag=id3v2() + bytes(700)), MP3, 1.2),
        Case("mp3-xing-vbr", mp3_vbr, MP3, 2.4),
        Case("mp3-xing-vbr-id3v2", id3v2(4000) + mp3_vbr, MP3, 2.4),
        Case("mp3-info-cbr", mp3(75, vbr_header="info"), MP3, 1.8),
        Case("mp3-vbri", mp3(100, vbr_header="vbri", later_frames=MPEG1_32K), MP3, 2.4),
        Case("mp3-mpeg2-24k", mp3(100, header=MPEG2_64K), MP3, 2.4),
        Case("mp3-mpeg2-xing", mp3(40, header=MPEG2_64K, vbr_header="xing"), MP3, 0.96),
        Case("ogg-opus", ogg_opus(3.0), OGG, 3.0),
        Case("ogg-opus-long-pre-skip", ogg_opus(2.0, pre_skip=3840), OGG, 2.0),
        Case("ogg-vorbis-44k", ogg_vorbis(2.5), OGG, 2.5),
        Case("ogg-vorbis-16k", ogg_vorbis(1.25, rate=16000), OGG, 1.25),
        Case("webm-duration", webm(4200.0), WEBM, 4.2),
        Case("webm-duration-float32", webm(1500.0, width=4), WEBM, 1.5),
        Case("webm-duration-microsecond-ticks", webm(2750.0, timecode_scale=1000), WEBM, 2.75),
        Case("webm-duration-default-scale", webm(3000.0, timecode_scale=None), WEBM, 3.0),
        Case("webm-void-before-info", webm(1000.0, void_before_info=True), WEBM, 1.0),
        Case("webm-unknown-sizes-duration", webm(5000.0, unknown_sizes=True), WEBM, 5.0),
        Case("matroska-duration", webm(2000.0, doc_type=b"matroska"), WEBM, 2.0),
        Case(
            "webm-void-before-segment",
            ebml_header() + element(0xEC, bytes(8)) + webm(750.0)[len(ebml_header()) :],
            WEBM,
            0.75,
        ),
        Case("webm-empty-duration", _webm_with_info(element(0x1549A966, element(0x4489, b""))), WEBM, 0.0),
        Case("webm-mediarecorder", webm(None, unknown_sizes=True), WEBM, None),
        Case("webm-no-duration-known-sizes", webm(None), WEBM, None),
        Case("mp4-mvhd-v0-moov-first", mp4(3.5), MP4, 3.5),
        Case("mp4-mvhd-v0-moov-last", mp4(3.5, moov_first=False), MP4, 3.5),
        Case("mp4-mvhd-v1-moov-first", mp4(61.25, version=1), MP4, 61.25),
        Case("mp4-mvhd-v1-moov-last", mp4(61.25, version=1, moov_first=False), MP4, 61.25),
        Case("mp4-timescale-44100", mp4(2.0, timescale=44100), MP4, 2.0),
        Case("mp4-large-mdat-moov-last", mp4(4.0, moov_first=False, large_mdat=True), MP4, 4.0),
        Case("mp4-isom-brand", mp4(1.0, brand=b"isom"), MP4, 1.0),
        Case("mp4-fragmented-sample-durations", fragmented_mp4(3), MP4, 3.0),
        Case("mp4-fragmented-trex-default", fragmented_mp4(4, per_sample_durations=False), MP4, 4.0),
        Case(
            "mp4-fragmented-tfhd-default",
            fragmented_mp4(2, per_sample_durations=False, default_in="tfhd"),
            MP4,
            2.0,
        ),
        Case("mp4-fragmented-mehd", fragmented_mp4(2, mehd_duration=2500), MP4, 2.5),
        Case("flac-16k", flac(32000), FLAC, 2.0),
        Case("flac-48k", flac(48000 * 7, rate=48000), FLAC, 7.0),
        Case("flac-id3v2", flac(24000, tag=id3v2()), FLAC, 1.5),
    ]


CASES = _cases()
CASE_IDS = [case.id for case in CASES]
# Small files for the fuzzers, so that mutations land in headers often.
SMALL = [
    wav(0.01),
    mp3(3),
    mp3(3, tag=id3v2(40), vbr_header="xing"),
    mp3(3, vbr_header="vbri"),
    ogg_opus(0.1),
    ogg_vorbis(0.05),
    webm(100.0, clusters=1),
    webm(None, unknown_sizes=True, clusters=1),
    mp4(1.0, mdat_bytes=16),
    mp4(1.0, version=1, moov_first=False, mdat_bytes=16),
    fragmented_mp4(2, samples=3),
    flac(1000),
    flac(1000, tag=id3v2(40)),
]


def rejection(data: bytes, *, max_bytes: int = 100 * MiB, max_seconds: float = 1e9) -> str:
    with pytest.raises(AudioRejected) as caught:
        inspect_upload(data, max_bytes=max_bytes, max_seconds=max_seconds)
    return caught.value.code


def outcome(
    data: bytes, *, max_bytes: int = 100 * MiB, max_seconds: float = 1e9
) -> tuple[AudioFormat, float | None] | AudioRejected:
    try:
        return inspect_upload(data, max_bytes=max_bytes, max_seconds=max_seconds)
    except AudioRejected as exc:
        return exc


def assert_handled(data: bytes) -> None:
    """What every input must satisfy: no exception but `AudioRejected`, sane durations, and
    `inspect_upload` consistent with `sniff` and `duration_seconds`."""
    fmt = sniff(data)
    assert fmt is None or fmt in FORMATS
    for candidate in FORMATS:
        for measure in (False, True):
            seconds = duration_seconds(data, candidate, measure=measure)
            assert seconds is None or (math.isfinite(seconds) and seconds >= 0)
    result = outcome(data, max_bytes=10 * MiB, max_seconds=600.0)
    if isinstance(result, AudioRejected):
        assert result.code in CODES
        assert result.message
        assert str(result) == result.message
        return
    accepted, seconds = result
    assert accepted == fmt
    assert seconds == duration_seconds(data, accepted)
    assert seconds is not None or accepted == WEBM
    assert seconds is None or seconds <= 600.0


# -- what each format is and how long it lasts ----------------------------------------------------


def test_formats_name_the_upload_for_the_transcriber() -> None:
    assert [(f.name, f.extension, f.content_type) for f in FORMATS] == [
        ("wav", "wav", "audio/wav"),
        ("mp3", "mp3", "audio/mpeg"),
        ("ogg", "ogg", "audio/ogg"),
        ("webm", "webm", "audio/webm"),
        ("mp4", "m4a", "audio/mp4"),
        ("flac", "flac", "audio/flac"),
    ]
    assert {f.extension for f in FORMATS} <= GROQ_EXTENSIONS


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_each_format_is_recognised_and_timed(case: Case) -> None:
    assert sniff(case.data) == case.fmt
    seconds = duration_seconds(case.data, case.fmt)
    if case.seconds is None:
        assert seconds is None
    else:
        assert seconds == pytest.approx(case.seconds, abs=1e-6)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_each_format_is_accepted_up_to_its_limits(case: Case) -> None:
    limit_seconds = case.seconds if case.seconds is not None else 0.001
    fmt, seconds = inspect_upload(case.data, max_bytes=len(case.data), max_seconds=limit_seconds + 1e-6)
    assert fmt == case.fmt
    assert seconds == duration_seconds(case.data, case.fmt)


def test_mediarecorder_webm_has_no_duration_and_is_accepted_on_its_size() -> None:
    data = webm(None, unknown_sizes=True)
    assert inspect_upload(data, max_bytes=len(data), max_seconds=0.001) == (WEBM, None)


@pytest.mark.parametrize("case", [case for case in CASES if case.seconds is not None], ids=lambda c: c.id)
def test_measuring_never_overrides_a_declared_duration(case: Case) -> None:
    assert duration_seconds(case.data, case.fmt, measure=True) == duration_seconds(case.data, case.fmt)


def test_webm_without_duration_is_measured_to_where_its_last_block_starts() -> None:
    """The builder's Clusters start 100 ms apart, each with 5 SimpleBlocks 20 ms apart: the
    last block of 30 Clusters starts at 2.98 s (and plays 20 ms more, which no SimpleBlock says)."""
    for data in (webm(None, unknown_sizes=True, clusters=30), webm(None, clusters=30)):
        assert duration_seconds(data, WEBM) is None
        assert duration_seconds(data, WEBM, measure=True) == pytest.approx(2.98)
    assert duration_seconds(webm(None, timecode_scale=1000, clusters=3), WEBM, measure=True) == pytest.approx(280e-6)


def _cluster(timecode: int, *blocks: bytes) -> bytes:
    return element(0x1F43B675, uint_element(0xE7, timecode) + b"".join(blocks), unknown_size=True)


def _simple_block(relative: int) -> bytes:
    return element(0xA3, b"\x81" + struct.pack(">hB", relative, 0x80) + OPUS_SILENCE)


def _mediarecorder_webm(*clusters: bytes) -> bytes:
    body = webm_info(None) + webm_tracks() + b"".join(clusters)
    return ebml_header() + element(0x18538067, body, unknown_size=True)


def test_webm_measure_reads_block_groups_and_relative_timestamps() -> None:
    block = element(0xA1, b"\x81" + struct.pack(">hB", 40, 0) + OPUS_SILENCE)
    group = element(0xA0, block + uint_element(0x9B, 60))  # BlockDuration: 60 ms
    assert duration_seconds(_mediarecorder_webm(_cluster(1000, group)), WEBM, measure=True) == pytest.approx(1.1)
    # Blocks may start before their Cluster's timestamp, and come in any order: the latest wins.
    later_first = _cluster(500, _simple_block(300), _simple_block(-100))
    assert duration_seconds(_mediarecorder_webm(later_first), WEBM, measure=True) == pytest.approx(0.8)
    assert duration_seconds(_mediarecorder_webm(_cluster(0), _cluster(100)), WEBM, measure=True) is None


def test_webm_measure_of_a_cut_recording_counts_its_complete_blocks() -> None:
    data = webm(None, unknown_sizes=True, clusters=10)
    full = duration_seconds(data, WEBM, measure=True)
    assert full is not None
    assert full == pytest.approx(0.98)
    last_cluster = data.rfind(b"\x1f\x43\xb6\x75")
    assert duration_seconds(data[:last_cluster], WEBM, measure=True) == pytest.approx(0.88)
    assert duration_seconds(data[:-1], WEBM, measure=True) == pytest.approx(0.96)  # the last block cut
    for length in cut_points(len(data)):
        seconds = duration_seconds(data[:length], WEBM, measure=True)
        assert seconds is None or seconds <= full, length


def test_webm_measure_gives_up_beyond_its_bound() -> None:
    """Half a million elements (here 2-byte Voids inside a Cluster) and the walk stops: the
    block after them is never read, and the duration is unknown rather than a guess."""
    voids = b"\xec\x80" * 500_000
    data = _mediarecorder_webm(_cluster(0, _simple_block(0), voids), _cluster(5000, _simple_block(0)))
    assert duration_seconds(data, WEBM, measure=True) is None
    assert duration_seconds(_mediarecorder_webm(_cluster(0, _simple_block(0), voids[:1000])), WEBM, measure=True) == 0


def test_mp3_frame_count_wins_over_the_constant_bit_rate_estimate() -> None:
    # The first frame says 128 kbit/s, the 99 others 32: a CBR estimate would be 0.64 s.
    data = mp3(100, vbr_header="xing", later_frames=MPEG1_32K)
    assert duration_seconds(data, MP3) == pytest.approx(2.4)
    without_header = mp3(100, later_frames=MPEG1_32K)
    assert duration_seconds(without_header, MP3) == pytest.approx(len(without_header) * 8 / 128000)


def test_ogg_duration_comes_from_the_last_page_that_has_a_granule_position() -> None:
    data = ogg_opus(2.0)
    continued = ogg_page(0x1234ABCD, 99, -1, [b"\x00" * 255])  # a packet that ends on no page: -1
    assert duration_seconds(data + continued, OGG) == pytest.approx(2.0)
    other_stream = ogg_page(0x5EED, 0, 48000 * 3600, [b"\x00" * 10], last=True)
    assert duration_seconds(data + other_stream, OGG) == pytest.approx(2.0)
    cut_page = ogg_page(0x1234ABCD, 99, 48000 * 3600, [b"\x00" * 100])[:60]
    assert duration_seconds(data + cut_page, OGG) == pytest.approx(2.0)


def test_ogg_duration_of_a_long_stream_comes_from_its_end() -> None:
    """About 1 MB: the first page is far outside the 64 KiB searched at the end."""
    packets = [b"\x00" * 200] * 50
    pages = [ogg_page(7, 0, 0, [opus_head(0)], first=True)]
    pages += [ogg_page(7, n, n * 48000, packets) for n in range(1, 100)]
    assert duration_seconds(b"".join(pages), OGG) == pytest.approx(99.0)


def test_mp4_box_running_to_the_end_of_the_file() -> None:
    data = ftyp() + box(b"moov", mvhd(1000, 1500)) + struct.pack(">I", 0) + b"mdat" + bytes(100)
    assert duration_seconds(data, MP4) == pytest.approx(1.5)
    moov_last = ftyp() + box(b"mdat", bytes(100)) + struct.pack(">I", 0) + b"moov" + mvhd(1000, 2500)
    assert duration_seconds(moov_last, MP4) == pytest.approx(2.5)  # a 0 size means "to the end"


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        pytest.param(ogg_page(1, 0, 0, [b"Speex   1.2" + bytes(69)], first=True), OGG, id="ogg-speex"),
        pytest.param(ebml_header(b"mkvfake") + webm(1000.0)[len(ebml_header()) :], WEBM, id="other-doctype"),
        pytest.param(wav(1.0), MP4, id="wav-as-mp4"),
        pytest.param(mp4(1.0), WAV, id="mp4-as-wav"),
        pytest.param(flac(16000), OGG, id="flac-as-ogg"),
        pytest.param(ogg_opus(1.0), FLAC, id="ogg-as-flac"),
        pytest.param(webm(1000.0), MP3, id="webm-as-mp3"),
        pytest.param(mp3(10), WEBM, id="mp3-as-webm"),
    ],
)
def test_bytes_read_as_a_format_they_are_not_have_no_duration(data: bytes, fmt: AudioFormat) -> None:
    assert sniff(data) != fmt
    assert duration_seconds(data, fmt) is None


def test_ogg_builder_crc_matches_the_standard_check_value() -> None:
    # CRC-32/CKSUM (same polynomial and init) checks "123456789" as 0x765E7680 after its final
    # XOR with 0xFFFFFFFF, which Ogg does not apply.
    assert ogg_crc(b"123456789") == 0x765E7680 ^ 0xFFFFFFFF


# -- refusals -------------------------------------------------------------------------------------


def test_empty_upload() -> None:
    assert rejection(b"") == "audio_empty"
    assert rejection(b"", max_bytes=0) == "audio_empty"


def test_too_large_upload() -> None:
    data = wav(1.0)
    assert inspect_upload(data, max_bytes=len(data), max_seconds=60)[0] == WAV
    assert rejection(data, max_bytes=len(data) - 1) == "audio_too_large"
    assert rejection(b"not audio at all", max_bytes=4) == "audio_too_large"  # before sniffing


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"hello, this is text", id="text"),
        pytest.param(b'{"audio": "base64..."}', id="json"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + bytes(100), id="png"),
        pytest.param(b"RIFF\x00\x10\x00\x00AVI LIST" + bytes(100), id="riff-avi"),
        pytest.param(b"RIFF\x00\x10\x00\x00WEBPVP8 " + bytes(100), id="riff-webp"),
        pytest.param(b"RIFF\x00\x00", id="riff-too-short-to-say"),
        pytest.param(box(b"ftyp", b"heic", bytes(4), b"mif1heic") + bytes(100), id="heic-image"),
        pytest.param(box(b"ftyp", b"avif", bytes(4), b"avifmif1") + bytes(100), id="avif-image"),
        pytest.param(ogg_page(1, 0, 0, [b"Speex   1.2" + bytes(69)], first=True) + bytes(100), id="ogg-speex"),
        pytest.param(ogg_page(1, 0, 0, [b"\x7fFLAC\x01\x00" + bytes(40)], first=True), id="ogg-flac"),
        pytest.param(b"OggS\x01" + bytes(100), id="ogg-unknown-version"),
        pytest.param(ebml_header(b"mkvfake") + bytes(40), id="ebml-other-doctype"),
        pytest.param(b"\xff\xf1\x50\x80\x02\x1f\xfc" * 40, id="adts-aac"),
        pytest.param(b"\xff\xfb\x94\xc4" + bytes(380) + b"not a frame", id="one-false-mpeg-sync"),
        pytest.param(b"ID3\x04\x00\x00\x80\x00\x00\x00" + bytes(100), id="id3-size-not-synchsafe"),
        pytest.param(b"ID3\x09\x00\x00\x00\x00\x00\x10" + bytes(100), id="id3-unknown-version"),
        pytest.param(b"\x00" * 1000, id="zeros"),
        pytest.param(b"fLa", id="three-bytes"),
    ],
)
def test_unsupported_upload(data: bytes) -> None:
    assert sniff(data) is None
    assert rejection(data) == "audio_unsupported"


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        pytest.param(b"RIFF\x24\x00\x00\x00WAVEdata\x00\x00\x00\x00", WAV, id="wav-without-fmt"),
        pytest.param(wav(1.0)[:36], WAV, id="wav-without-data"),
        pytest.param(wav(1.0)[:28] + bytes(4) + wav(1.0)[32:], WAV, id="wav-byte-rate-0"),
        pytest.param(wav(1.0)[:16] + b"\x08\x00\x00\x00" + wav(1.0)[20:], WAV, id="wav-fmt-too-short"),
        pytest.param(id3v2(500), MP3, id="mp3-tag-without-frames"),
        pytest.param(id3v2(500) + b"\x00" * 20000, MP3, id="mp3-tag-then-no-frames"),
        pytest.param(b"ID3\x04\x00", MP3, id="mp3-tag-header-cut"),
        pytest.param(ogg_opus(1.0)[:40], OGG, id="ogg-first-page-cut"),
        pytest.param(ogg_page(1, 0, 0, [], first=True), OGG, id="ogg-first-page-without-packet"),
        pytest.param(ogg_page(1, 0, 0, [vorbis_identification(0)], first=True), OGG, id="vorbis-rate-0"),
        pytest.param(
            ogg_page(1, 0, -1, [opus_head()], first=True) + ogg_page(1, 1, -1, [b"\x00" * 300]),
            OGG,
            id="ogg-no-granule-position",
        ),
        pytest.param(ebml_header()[:20], WEBM, id="webm-header-cut"),
        pytest.param(ebml_header(), WEBM, id="webm-without-segment"),
        pytest.param(_webm_with_info(webm_info(1000.0), tracks=False), WEBM, id="webm-without-tracks"),
        pytest.param(_webm_with_info(webm_info(1000.0), clusters=False), WEBM, id="webm-without-clusters"),
        pytest.param(_webm_with_info(webm_info(float("nan"))), WEBM, id="webm-duration-nan"),
        pytest.param(_webm_with_info(webm_info(-5.0)), WEBM, id="webm-duration-negative"),
        pytest.param(_webm_with_info(webm_info(float("inf"))), WEBM, id="webm-duration-infinite"),
        pytest.param(_webm_with_info(element(0x1549A966, uint_element(0x2AD7B1, 0))), WEBM, id="webm-scale-0"),
        pytest.param(
            _webm_with_info(element(0x1549A966, element(0x4489, b"\x00\x00\x01"))),
            WEBM,
            id="webm-duration-3-bytes",
        ),
        pytest.param(ftyp() + box(b"mdat", bytes(100)), MP4, id="mp4-without-moov"),
        pytest.param(ftyp() + box(b"moov", mvhd(0, 100)), MP4, id="mp4-timescale-0"),
        pytest.param(ftyp() + box(b"moov", full_box(b"free", 0, 0)), MP4, id="mp4-without-mvhd"),
        pytest.param(mp4(2.0)[:200], MP4, id="mp4-moov-cut"),
        pytest.param(fragmented_mp4(2)[: len(fragmented_mp4(0)) + 20], MP4, id="mp4-fragments-cut"),
        pytest.param(fragmented_mp4(2, per_sample_durations=False, default_in="nowhere"), MP4, id="mp4-no-durations"),
        pytest.param(ftyp() + struct.pack(">I", 4) + b"moov", MP4, id="mp4-box-smaller-than-header"),
        pytest.param(flac(0), FLAC, id="flac-total-samples-unknown"),
        pytest.param(flac(1000, rate=0), FLAC, id="flac-rate-0"),
        pytest.param(flac(1000, first_block_type=4), FLAC, id="flac-streaminfo-not-first"),
        pytest.param(b"fLaC\x00\x00\x00\x22" + bytes(10), FLAC, id="flac-streaminfo-cut"),
    ],
)
def test_undecodable_upload(data: bytes, fmt: AudioFormat) -> None:
    assert sniff(data) == fmt
    assert rejection(data) == "audio_undecodable"


@pytest.mark.parametrize("case", [case for case in CASES if case.seconds is not None], ids=lambda c: c.id)
def test_too_long_upload(case: Case) -> None:
    assert case.seconds is not None
    assert rejection(case.data, max_seconds=case.seconds - 0.01) == "audio_too_long"
    assert inspect_upload(case.data, max_bytes=len(case.data), max_seconds=case.seconds + 1e-6)[0] == case.fmt


def test_refusals_come_in_order() -> None:
    """empty, too large, unsupported, undecodable, too long: the first that applies wins."""
    assert rejection(b"", max_bytes=0, max_seconds=0) == "audio_empty"
    assert rejection(b"garbage" * 10, max_bytes=10, max_seconds=0) == "audio_too_large"
    assert rejection(wav(10.0), max_bytes=100, max_seconds=1) == "audio_too_large"
    assert rejection(b"garbage" * 10, max_seconds=0) == "audio_unsupported"
    assert rejection(flac(0), max_seconds=0) == "audio_undecodable"
    assert rejection(wav(10.0), max_seconds=1) == "audio_too_long"


def test_messages_are_for_people() -> None:
    messages = {}
    attempts = [
        (b"", 10 * MiB, 120.0),
        (bytes(10 * MiB + 1), 10 * MiB, 120.0),
        (b"garbage", 10 * MiB, 120.0),
        (flac(0), 10 * MiB, 120.0),
        (wav(200.0, rate=8000), 10 * MiB, 120.0),
    ]
    for data, max_bytes, max_seconds in attempts:
        with pytest.raises(AudioRejected) as caught:
            inspect_upload(data, max_bytes=max_bytes, max_seconds=max_seconds)
        messages[caught.value.code] = caught.value.message
    assert set(messages) == CODES
    assert "10 MB" in messages["audio_too_large"]
    assert "2 minutes" in messages["audio_too_long"]
    for message in messages.values():
        assert message[0].isupper()
        assert message.endswith(".")
        for internal in ("Malformed", "struct", "moov", "mvhd", "EBML", "granule", "Traceback", "None"):
            assert internal not in message


# -- cut short ------------------------------------------------------------------------------------


def cut_points(length: int) -> Iterator[int]:
    """Every length up to 2 KiB (where the headers are), then 256 more across the file."""
    yield from range(min(length, 2048))
    yield from range(2048, length, max(1, length // 256))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_truncation_is_handled(case: Case) -> None:
    allowed = {None, case.fmt} | ({MP3} if case.data.startswith(b"ID3") else set())
    # A cut ID3v1 trailer no longer looks like one: its 128 bytes then count as CBR audio.
    tolerance = 128 * 8 / 128000
    for length in cut_points(len(case.data)):
        prefix = case.data[:length]
        assert sniff(prefix) in allowed, length
        assert_handled(prefix)
        result = outcome(prefix)
        if isinstance(result, AudioRejected):
            assert result.code in {"audio_empty", "audio_unsupported", "audio_undecodable"}, length
            continue
        fmt, seconds = result
        assert fmt == case.fmt, length
        if case.seconds is not None and seconds is not None:
            assert seconds <= case.seconds + tolerance, length  # a cut never adds time


def _cut_before(data: bytes, marker: bytes) -> bytes:
    position = data.find(marker)
    assert position > 0
    return data[:position]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(wav(1.0)[:30], id="wav-inside-fmt"),
        pytest.param(wav(1.0)[:42], id="wav-inside-data-header"),
        pytest.param(mp3(50, tag=id3v2(2000))[:1500], id="mp3-inside-tag"),
        pytest.param(ogg_opus(1.0)[:45], id="opus-inside-head"),
        pytest.param(ogg_vorbis(1.0)[:50], id="vorbis-inside-identification"),
        pytest.param(_cut_before(webm(1000.0), b"\x1f\x43\xb6\x75"), id="webm-before-first-cluster"),
        pytest.param(_cut_before(webm(None, unknown_sizes=True), b"\x16\x54\xae\x6b"), id="webm-before-tracks"),
        pytest.param(_cut_before(mp4(2.0, moov_first=False), b"moov") + b"\x00", id="mp4-before-moov"),
        pytest.param(_cut_before(mp4(2.0), b"trak"), id="mp4-inside-moov"),
        pytest.param(flac(16000)[:30], id="flac-inside-streaminfo"),
        pytest.param(flac(16000, tag=id3v2())[:900], id="flac-inside-tag"),
    ],
)
def test_cut_inside_the_headers_is_undecodable(data: bytes) -> None:
    assert rejection(data) == "audio_undecodable"


# -- arbitrary and damaged input ------------------------------------------------------------------

MAGICS = [
    b"RIFF\x00\x00\x00\x00WAVE",
    b"RIFF\x00\x00\x00\x00WAVEfmt \x10\x00\x00\x00",
    b"ID3\x04\x00\x00\x00\x00\x00\x10",
    MPEG1_128K,
    MPEG2_64K,
    b"OggS\x00\x02",
    b"fLaC\x00\x00\x00\x22",
    b"\x1a\x45\xdf\xa3",
    ebml_header() + b"\x18\x53\x80\x67",
    b"\x00\x00\x00\x18ftypM4A ",
    ftyp() + b"\x00\x00\x00\x00moov",
]


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_are_handled(data: bytes) -> None:
    assert_handled(data)


@FUZZ
@given(st.sampled_from(MAGICS), st.binary(max_size=1024))
def test_bytes_after_a_magic_number_are_handled(magic: bytes, rest: bytes) -> None:
    assert_handled(magic + rest)


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """A small valid file with a few bytes replaced, inserted or deleted (mostly in the first
    256 bytes, where the headers are), and perhaps cut short."""
    data = bytearray(draw(st.sampled_from(SMALL)))
    for _ in range(draw(st.integers(1, 6))):
        limit = max(len(data) - 1, 0)
        position = draw(st.one_of(st.integers(0, min(255, limit)), st.integers(0, limit)))
        chunk = draw(st.binary(min_size=1, max_size=8))
        action = draw(st.sampled_from(["replace", "insert", "delete"]))
        if action == "replace":
            data[position : position + len(chunk)] = chunk
        elif action == "insert":
            data[position:position] = chunk
        else:
            del data[position : position + len(chunk)]
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


@FUZZ
@given(damaged())
def test_damaged_files_are_handled(data: bytes) -> None:
    assert_handled(data)


@FUZZ
@given(st.sampled_from(SMALL), st.data())
def test_random_truncations_are_handled(data: bytes, draw: st.DataObject) -> None:
    start = draw.draw(st.integers(0, len(data)))
    end = draw.draw(st.integers(start, len(data)))
    assert_handled(data[:end])
    assert_handled(data[start:end])  # a stream joined late, too


# -- bounded work ---------------------------------------------------------------------------------

# What the app makes of each hostile input: refused, or, for the two valid files, their
# duration (fragmented_mp4's samples last 960/48000 s). What they cost is measured in
# bench/audio_bench.py (docs/benchmarks.md#hostile-audio-uploads).
HOSTILE_OUTCOMES: dict[str, object] = {
    "0xff": "audio_unsupported",
    "mp4-tiny-boxes": "audio_undecodable",
    "mp4-tiny-fragments": "audio_undecodable",
    "mp4-huge-fragment": (MP4, pytest.approx((HOSTILE_SIZE // 8) * 960 / 48000)),
    "id3-then-false-syncs": "audio_undecodable",
    "ogg-then-capture-patterns": "audio_undecodable",
    "wav-tiny-chunks": "audio_undecodable",
    "webm-voids": "audio_undecodable",
    "mp3-long-cbr": (MP3, pytest.approx((HOSTILE_SIZE // 384) * MPEG1_SAMPLES / MPEG1_RATE)),
}


def test_hostile_inputs_are_handled() -> None:
    """20 MiB built to make a parser walk, scan or sum as much as possible, read as the app
    reads an upload under a limit it fits in."""
    seen = []
    for name, data in hostile_inputs():
        seen.append(name)
        assert_handled(data)
        result = outcome(data, max_bytes=2 * HOSTILE_SIZE)
        assert (result.code if isinstance(result, AudioRejected) else result) == HOSTILE_OUTCOMES[name], name
    assert seen == list(HOSTILE_OUTCOMES)
