"""The simulator's transcription endpoint reports how long a recording plays, whatever its
container: the same clip as WAV, MP3, Ogg, WebM, MP4 or FLAC gets the same `duration` and
the same "talked for about N seconds", and a container whose duration cannot be read is
refused, as a decoder would refuse it.

The WAV and the lame MP3 carry the simulator's tone; the other containers are built in
`tests.audio_support` with the clip's timing (no encoder for them is installed).
"""

from __future__ import annotations

import shutil

import httpx
import pytest

from sim import audio, mp3
from tests import audio_support
from tests.sim_support import upload

# Clear of the 3.5 s at which "about 3 seconds" turns into "about 4", so that every
# container's small difference in timing leaves the transcript's words alike.
CLIP_SECONDS = 3.6
TOLERANCE_SECONDS = 0.1
TONE_TEXT = "Hello there, this is the same short recording in every container format we know"
LAME_RATE = 44100


def tone(rate: int) -> bytes:
    """The clip: the simulator's tone for TONE_TEXT, cut or padded to CLIP_SECONDS."""
    size = 2 * round(CLIP_SECONDS * rate)
    pcm = audio.tone_pcm(TONE_TEXT, rate)[:size]
    return pcm + bytes(size - len(pcm))


def clip_files() -> list[object]:
    rate = 16000
    blocks = round(CLIP_SECONDS * 10)  # the WebM builder's Clusters hold 100 ms each
    mp3_frames = round(CLIP_SECONDS * audio_support.MPEG1_RATE / audio_support.MPEG1_SAMPLES)
    lame = shutil.which("lame")
    return [
        pytest.param("clip.wav", audio_support.pcm_wav(tone(rate), rate), id="wav"),
        pytest.param(
            "clip.mp3",
            mp3.lame_mp3(tone(LAME_RATE), LAME_RATE, 128, lame) if lame else b"",
            id="mp3-lame",
            marks=pytest.mark.skipif(lame is None, reason="lame is not installed"),
        ),
        pytest.param("clip.mp3", audio_support.mp3(mp3_frames, tag=audio_support.id3v2()), id="mp3-cbr"),
        pytest.param("clip.mpga", audio_support.mp3(mp3_frames, vbr_header="xing"), id="mp3-xing"),
        pytest.param("clip.opus", audio_support.ogg_opus(CLIP_SECONDS), id="ogg-opus"),
        pytest.param("clip.ogg", audio_support.ogg_vorbis(CLIP_SECONDS), id="ogg-vorbis"),
        pytest.param("clip.webm", audio_support.webm(CLIP_SECONDS * 1000, clusters=blocks), id="webm-duration"),
        pytest.param(
            "clip.webm",
            audio_support.webm(None, unknown_sizes=True, clusters=blocks),
            id="webm-mediarecorder",
        ),
        pytest.param("clip.m4a", audio_support.mp4(CLIP_SECONDS), id="mp4"),
        pytest.param(
            "clip.mp4",
            audio_support.fragmented_mp4(3, samples=round(CLIP_SECONDS / 3 * 50)),  # 20 ms samples
            id="mp4-fragmented",
        ),
        pytest.param("clip.flac", audio_support.flac(round(CLIP_SECONDS * rate), rate=rate), id="flac"),
    ]


@pytest.mark.parametrize(("filename", "data"), clip_files())
def test_the_same_clip_lasts_as_long_in_every_container(http: httpx.Client, filename: str, data: bytes) -> None:
    response = upload(http, data, filename, response_format="verbose_json")
    assert response.status_code == 200, response.text
    verbose = response.json()
    assert verbose["duration"] == pytest.approx(CLIP_SECONDS, abs=TOLERANCE_SECONDS)
    assert verbose["segments"][0]["end"] == verbose["duration"]
    assert verbose["text"].endswith(f"the speaker talked for about {round(CLIP_SECONDS)} seconds.")


@pytest.mark.parametrize(
    ("filename", "data"),
    [
        pytest.param("clip.flac", audio_support.flac(0), id="flac-total-samples-unknown"),
        pytest.param("clip.webm", audio_support.ebml_header(), id="webm-without-segment"),
        pytest.param(
            "clip.webm",
            audio_support.webm(None, unknown_sizes=True, clusters=0) + audio_support.webm_cluster(0, blocks=0),
            id="webm-without-blocks",
        ),
        pytest.param("clip.ogg", audio_support.ogg_opus(1.0)[:40], id="ogg-cut-in-its-first-page"),
        pytest.param("clip.mp3", audio_support.id3v2(500), id="mp3-tag-without-frames"),
        pytest.param("clip.m4a", audio_support.ftyp() + audio_support.box(b"mdat", bytes(100)), id="mp4-without-moov"),
    ],
)
def test_a_recording_whose_duration_cannot_be_read_is_refused(http: httpx.Client, filename: str, data: bytes) -> None:
    response = upload(http, data, filename, response_format="verbose_json")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "file"
    assert error["message"] == "could not process file - is it a valid media file?"
