"""Helpers for the simulator's tests: a simulator on a loopback thread, audio files to
upload, an MPEG audio frame parser, and stand-ins for espeak-ng and lame.

The stand-ins are small Python scripts: they let the tests drive the simulator's
subprocess paths (arguments, standard input, the WAV it parses back) on machines where the
real tools are not installed.
"""

from __future__ import annotations

import io
import os
import stat
import sys
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from sim.app import build_app
from sim.settings import SimSettings
from tests import audio_support
from tests.servers import ServerThread, serve

GROQ_KEY = "gsk_test_key"
ELEVEN_KEY = "xi_test_key"
VOICE = "21m00Tcm4TlvDq8ikWAM"  # 20 alphanumerics, like ElevenLabs' "Rachel"
CHAT_PATH = "/openai/v1/chat/completions"
TRANSCRIBE_PATH = "/openai/v1/audio/transcriptions"

# Values for the simulator under test: nothing depends on the machine's tools.
TEST_SETTINGS: dict[str, Any] = {
    "groq_api_key": GROQ_KEY,
    "elevenlabs_api_key": ELEVEN_KEY,
    "speech_engine": "tone",
    "mp3_encoder": "silent",
}


def start_sim(**overrides: Any) -> ServerThread:
    settings = SimSettings(**{**TEST_SETTINGS, **overrides})
    return serve(build_app(settings), timeout_graceful_shutdown=2)


@contextmanager
def running_sim(**overrides: Any) -> Iterator[ServerThread]:
    server = start_sim(**overrides)
    try:
        yield server
    finally:
        server.stop()


def client(server: ServerThread, timeout: float = 10.0) -> httpx.Client:
    return httpx.Client(base_url=server.url, trust_env=False, timeout=timeout)


def groq_headers(key: str = GROQ_KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def eleven_headers(key: str = ELEVEN_KEY) -> dict[str, str]:
    return {"xi-api-key": key}


def chat_body(*messages: tuple[str, str], **extra: Any) -> dict[str, Any]:
    return {
        "model": "llama-3.3-70b-versatile",
        "messages": [{"role": role, "content": content} for role, content in messages],
        **extra,
    }


def wav_file(seconds: float, rate: int = 16000, seed: int = 0) -> bytes:
    """A 16-bit mono WAV of `seconds`, its samples varied by `seed`."""
    frames = int(seconds * rate)
    samples = bytes((n * 7 + seed) % 256 for n in range(min(frames * 2, 4096)))
    data = (samples * (frames * 2 // len(samples) + 1))[: frames * 2]
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(data)
    return buffer.getvalue()


# A short file of each container the transcription endpoint knows, for each extension.
CONTAINER_SAMPLES: dict[str, bytes] = {
    "flac": audio_support.flac(1600),
    "mp3": audio_support.mp3(5, tag=audio_support.id3v2()),
    "mpga": audio_support.mp3(5),
    "mpeg": audio_support.mp3(5, header=audio_support.MPEG2_64K),
    "mp4": audio_support.mp4(0.1, brand=b"isom"),
    "m4a": audio_support.mp4(0.1),
    "ogg": audio_support.ogg_vorbis(0.1),
    "opus": audio_support.ogg_opus(0.1),
    "webm": audio_support.webm(100.0, clusters=1),
    "wav": wav_file(0.1),
}


def upload(
    http: httpx.Client,
    content: bytes,
    filename: str = "speech.wav",
    *,
    headers: dict[str, str] | None = None,
    fields: dict[str, str] | None = None,
    **more_fields: str,
) -> httpx.Response:
    """Uploads `content` for transcription; a field given as "" is left out."""
    data = {"model": "whisper-large-v3-turbo", **(fields or {}), **more_fields}
    data = {name: value for name, value in data.items() if value != ""}
    return http.post(
        TRANSCRIBE_PATH,
        headers=groq_headers() if headers is None else headers,
        data=data,
        files={"file": (filename, content, "application/octet-stream")},
    )


# -- MPEG audio frames --------------------------------------------------------------------------------

MPEG1_KBPS = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
MPEG2_KBPS = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
MPEG1_RATES = (44100, 48000, 32000)
MPEG2_RATES = (22050, 24000, 16000)


@dataclass(frozen=True)
class Frame:
    offset: int
    mpeg1: bool
    kbps: int
    rate: int
    padded: bool
    mono: bool
    length: int

    @property
    def samples(self) -> int:
        return 1152 if self.mpeg1 else 576


def parse_mp3_frames(data: bytes) -> list[Frame]:
    """Every frame of a Layer III stream, checked as a decoder would: the 11-bit sync word,
    a known version, layer III, a valid bit-rate and sample-rate index, and the next frame
    starting exactly where this one's computed length ends. Raises on anything else."""
    frames: list[Frame] = []
    offset = 0
    while offset < len(data):
        header = data[offset : offset + 4]
        if len(header) < 4:
            raise AssertionError(f"truncated header at {offset}")
        if header[0] != 0xFF or header[1] & 0xE0 != 0xE0:
            raise AssertionError(f"no sync word at {offset}: {header.hex()}")
        version = (header[1] >> 3) & 0b11
        layer = (header[1] >> 1) & 0b11
        if version not in (0b11, 0b10):
            raise AssertionError(f"unexpected MPEG version bits {version:02b} at {offset}")
        if layer != 0b01:
            raise AssertionError(f"not layer III at {offset}")
        mpeg1 = version == 0b11
        bitrate_index = header[2] >> 4
        rate_index = (header[2] >> 2) & 0b11
        if bitrate_index in (0, 15) or rate_index == 3:
            raise AssertionError(f"invalid bit-rate or sample-rate index at {offset}")
        kbps = (MPEG1_KBPS if mpeg1 else MPEG2_KBPS)[bitrate_index]
        rate = (MPEG1_RATES if mpeg1 else MPEG2_RATES)[rate_index]
        padded = bool(header[2] >> 1 & 1)
        length = (144 if mpeg1 else 72) * kbps * 1000 // rate + int(padded)
        if offset + length > len(data):
            raise AssertionError(f"frame at {offset} runs past the end ({length} bytes)")
        frames.append(Frame(offset, mpeg1, kbps, rate, padded, header[3] >> 6 == 0b11, length))
        offset += length
    return frames


# -- stand-ins for espeak-ng and lame -------------------------------------------------------------------


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


FAKE_ESPEAK_RATE = 22050


def fake_espeak(directory: Path) -> Path:
    """Writes a WAV to stdout as espeak-ng does into a pipe: 22,050 Hz, 16-bit mono, sizes
    0x7FFFFFFF (unknown). 0.05 s of a ramp per character of standard input; its arguments
    and input go to `<script>.log`."""
    return _script(
        directory / "espeak-ng",
        f"""
import struct, sys
text = sys.stdin.buffer.read()
with open(__file__ + ".log", "ab") as log:
    log.write(repr((sys.argv[1:], text)).encode() + b"\\n")
frames = int(0.05 * {FAKE_ESPEAK_RATE}) * len(text)
pcm = b"".join(struct.pack("<h", (n * 64) % 20000 - 10000) for n in range(frames))
header = b"RIFF" + struct.pack("<I", 0x7FFFFFFF) + b"WAVE"
header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, {FAKE_ESPEAK_RATE}, {FAKE_ESPEAK_RATE} * 2, 2, 16)
header += b"data" + struct.pack("<I", 0x7FFFFFFF)
sys.stdout.buffer.write(header + pcm)
""",
    )


FAKE_MP3 = b"\xff\xfbFAKE-LAME-OUTPUT"


def fake_lame(directory: Path) -> Path:
    """Reads raw PCM from stdin, logs its arguments and the input size, prints FAKE_MP3."""
    return _script(
        directory / "lame",
        f"""
import sys
data = sys.stdin.buffer.read()
with open(__file__ + ".log", "ab") as log:
    log.write(repr((sys.argv[1:], len(data))).encode() + b"\\n")
sys.stdout.buffer.write({FAKE_MP3!r})
""",
    )


def logged_calls(script: Path) -> list[tuple[Any, ...]]:
    log = Path(f"{script}.log")
    if not log.exists():
        return []
    import ast

    return [ast.literal_eval(line) for line in log.read_text().splitlines()]


def environment_without_sim() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith("SIM_")}
