"""`python scripts/smoke.py [--recording FILE.wav] BASE_URL`: does a deployment work, end to
end, through its edge?

One line per step, in order, on standard output: `smoke: <step> ok (<ms> ms)`, or
`FAIL: <step>: <reason>` and no further steps (but the session made is still deleted).
Exit status 0 only if every step passed, 1 otherwise, 2 for a bad argument.

The steps: the edge's readiness (`/_edge/ready`), the app's through the edge
(`/api/v1/ready`), a new session, a text turn, a voice turn, the voice turn's reply audio
(`audio_url`), and the session's deletion, checked by a 404 after it. The recording is a
WAV given with `--recording` (real speech, for a real transcriber) or one this script
makes (a voiced buzz: the simulator transcribes it, a real transcriber hears no words). A
turn passes only with a reply, its audio and nothing degraded. Nothing it prints names a
session or audio id (they are capabilities).
Works against any deployment: `make run`, the compose stack, a hosted one
(docs/deployment.md#the-smoke-test).
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

REQUEST_TIMEOUT_S = 15.0
# Longer than a turn may take in the app (APP_TURN_TIMEOUT_S, 60 s), so its own answer arrives.
TURN_TIMEOUT_S = 90.0
SAMPLE_RATE = 16_000
RECORDING_S = 1.5
HARMONICS = 16
API = "/api/v1"


class StepFailed(Exception):
    """What went wrong, in a few words fit for the FAIL line."""


@dataclass
class Smoke:
    client: httpx.Client
    recording: bytes
    session_path: str | None = None
    audio_url: str | None = None

    def step(self, name: str, action: Callable[[], None]) -> None:
        started = time.monotonic()
        action()
        print(f"smoke: {name} ok ({(time.monotonic() - started) * 1000:.0f} ms)", flush=True)

    def edge_ready(self) -> None:
        expect(self.client.get("/_edge/ready"), 200, "status", "ready")

    def app_ready(self) -> None:
        expect(self.client.get(f"{API}/ready"), 200, "status", "ready")

    def create_session(self) -> None:
        document = expect(self.client.post(f"{API}/sessions"), 201)
        session_id = document.get("session_id")
        if not isinstance(session_id, str) or not session_id:
            raise StepFailed("the answer has no session_id")
        self.session_path = f"{API}/sessions/{session_id}"

    def text_turn(self) -> None:
        response = self.client.post(
            f"{self.session()}/turns", json={"text": "Hello! My dog is called Max."}, timeout=TURN_TIMEOUT_S
        )
        check_turn(expect(response, 200))

    def voice_turn(self) -> None:
        files = {"audio": ("smoke.wav", self.recording, "audio/wav")}
        document = expect(self.client.post(f"{self.session()}/turns", files=files, timeout=TURN_TIMEOUT_S), 200)
        if not str(document.get("transcript") or "").strip():
            raise StepFailed("the turn has no transcript")
        self.audio_url = check_turn(document)

    def reply_audio(self) -> None:
        if self.audio_url is None:
            raise StepFailed("no voice turn to fetch the audio of")
        response = self.client.get(self.audio_url)
        expect_status(response, 200)
        content_type = response.headers.get("content-type", "")
        if not content_type.startswith("audio/"):
            raise StepFailed(f"content-type {content_type!r}, not audio")
        if not response.content:
            raise StepFailed("the audio is empty")
        if content_type == "audio/mpeg" and not is_mp3(response.content):
            raise StepFailed("audio/mpeg that is not MP3")

    def delete_session(self) -> None:
        expect_status(self.client.delete(self.session()), 204)

    def session_gone(self) -> None:
        expect_status(self.client.get(self.session()), 404)
        self.session_path = None

    def session(self) -> str:
        if self.session_path is None:
            raise StepFailed("no session")
        return self.session_path

    def describe(self, error: httpx.HTTPError) -> str:
        """The error in its own words, without the session's path should they hold it."""
        message = f"{type(error).__name__}: {error}".rstrip(": ")
        return message.replace(self.session_path, f"{API}/sessions/{{session}}") if self.session_path else message

    def clean_up(self) -> None:
        """After a failure: the session made is deleted all the same, if it can be."""
        if self.session_path is not None:
            with contextlib.suppress(httpx.HTTPError):
                self.client.delete(self.session_path)


def expect_status(response: httpx.Response, status: int) -> None:
    if response.status_code != status:
        raise StepFailed(f"status {response.status_code}, expected {status}{error_code(response)}")


def expect(response: httpx.Response, status: int, key: str | None = None, value: str | None = None) -> dict[str, Any]:
    expect_status(response, status)
    try:
        document = response.json()
    except ValueError:
        raise StepFailed("the answer is not JSON") from None
    if not isinstance(document, dict):
        raise StepFailed("the answer is not a JSON object")
    if key is not None and document.get(key) != value:
        raise StepFailed(f"{key} is {document.get(key)!r}, expected {value!r}")
    return document


def error_code(response: httpx.Response) -> str:
    """The error envelope's code and request id, when the answer is one."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(error, dict):
        return ""
    return f" ({error.get('code')}, request id {error.get('request_id')})"


def check_turn(document: dict[str, Any]) -> str:
    """A whole turn: a reply, its audio, nothing degraded. Returns the audio's path."""
    if not str(document.get("reply") or "").strip():
        raise StepFailed("the turn has no reply")
    degraded = document.get("degraded")
    if degraded:
        raise StepFailed(f"degraded: {', '.join(map(str, degraded))}")
    audio_url = document.get("audio_url")
    if not isinstance(audio_url, str) or not audio_url.startswith("/"):
        raise StepFailed("the turn has no audio_url")
    return audio_url


def voiced_recording() -> bytes:
    """RECORDING_S of a voice-like buzz: a falling pitch's harmonics shaped by two vowel
    formants, in three syllables; 16-bit mono WAV."""
    frames = bytearray()
    phase = 0.0
    block = SAMPLE_RATE // 100  # the pitch and its harmonics' gains change every 10 ms
    for start in range(0, int(SAMPLE_RATE * RECORDING_S), block):
        pitch = 140.0 - 30.0 * start / (SAMPLE_RATE * RECORDING_S)
        gains = [formant_gain(harmonic * pitch) / harmonic for harmonic in range(1, HARMONICS + 1)]
        for index in range(start, start + block):
            phase += 2 * math.pi * pitch / SAMPLE_RATE
            sample = sum(gain * math.sin(harmonic * phase) for harmonic, gain in enumerate(gains, 1))
            syllables = math.sin(math.pi * 3 * index / (SAMPLE_RATE * RECORDING_S)) ** 2
            value = int(max(-1.0, min(1.0, 0.3 * sample * syllables)) * 32767)
            frames += value.to_bytes(2, "little", signed=True)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as recording:
        recording.setnchannels(1)
        recording.setsampwidth(2)
        recording.setframerate(SAMPLE_RATE)
        recording.writeframes(bytes(frames))
    return buffer.getvalue()


def formant_gain(frequency: float) -> float:
    return sum(math.exp(-(((frequency - centre) / 150.0) ** 2)) for centre in (700.0, 1200.0)) + 0.05


def is_mp3(data: bytes) -> bool:
    return data.startswith(b"ID3") or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)


USAGE = "usage: smoke.py [--recording FILE.wav] BASE_URL   (e.g. http://127.0.0.1:8080)"


def main(arguments: list[str]) -> int:
    recording = voiced_recording()
    if len(arguments) == 3 and arguments[0] == "--recording":
        try:
            recording = Path(arguments[1]).read_bytes()
        except OSError as error:
            print(f"smoke.py: cannot read the recording: {error.strerror}", file=sys.stderr)
            return 2
        arguments = arguments[2:]
    if len(arguments) != 1 or urlsplit(arguments[0]).scheme not in ("http", "https"):
        print(USAGE, file=sys.stderr)
        return 2
    with httpx.Client(base_url=arguments[0].rstrip("/"), timeout=REQUEST_TIMEOUT_S) as client:
        smoke = Smoke(client, recording)
        steps = (
            ("edge ready", smoke.edge_ready),
            ("app ready", smoke.app_ready),
            ("session", smoke.create_session),
            ("text turn", smoke.text_turn),
            ("voice turn", smoke.voice_turn),
            ("reply audio", smoke.reply_audio),
            ("delete session", smoke.delete_session),
            ("session gone", smoke.session_gone),
        )
        for name, action in steps:
            try:
                smoke.step(name, action)
            except StepFailed as failure:
                print(f"FAIL: {name}: {failure}", flush=True)
                smoke.clean_up()
                return 1
            except httpx.HTTPError as error:
                print(f"FAIL: {name}: {smoke.describe(error)}", flush=True)
                smoke.clean_up()
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
