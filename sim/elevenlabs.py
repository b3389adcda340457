"""ElevenLabs' text-to-speech: `POST /v1/text-to-speech/{voice_id}` and its `/stream` twin.

Errors come as ElevenLabs sends them: `{"detail": {"status", "message"}}` for refusals, and
FastAPI's `{"detail": [{"type", "loc", "msg", "input"}]}` (422) for a body that does not fit
the schema. Every response carries `request-id` and the concurrency headers
`current-concurrent-requests` / `maximum-concurrent-requests`; more requests in flight
than SIM_ELEVENLABS_MAX_CONCURRENT get 429 `too_many_concurrent_requests`.

`/stream` sends the same audio chunked, in pieces of whole MP3 frames (or PCM samples), each
as it is synthesised under the latency profile (sim/latency.py); a streaming request holds
its concurrency slot until its last byte.

Audio: `audio/mpeg` for the mp3 formats; `audio/pcm` for the raw PCM formats (16-bit
little-endian mono, no header), the content type ElevenLabs sends for them. Its OpenAPI
document lists only `audio/mpeg` for the 200 response, whatever the format.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sim import audio, mp3
from sim.latency import Latency, SpeechPace
from sim.pipeline import CLIENT_CLOSED, Call, PacedStream, SimState, provider_endpoint
from sim.settings import SimSettings

logger = logging.getLogger("sim.elevenlabs")

MAX_TEXT_CHARACTERS = 5000
MAX_JSON_BODY = 1024 * 1024
STREAM_CHUNK_BYTES = 4096  # at most, in whole MP3 frames
DEFAULT_OUTPUT_FORMAT = "mp3_44100_128"
MODELS = frozenset(
    {"eleven_multilingual_v2", "eleven_turbo_v2_5", "eleven_flash_v2_5", "eleven_turbo_v2", "eleven_flash_v2"}
)
VOICE_ID = re.compile(r"[A-Za-z0-9]{20}")


@dataclass(frozen=True)
class OutputFormat:
    codec: Literal["mp3", "pcm"]
    rate: int
    kbps: int = 0

    @property
    def media_type(self) -> str:
        return "audio/mpeg" if self.codec == "mp3" else "audio/pcm"


OUTPUT_FORMATS: dict[str, OutputFormat] = {
    "mp3_22050_32": OutputFormat("mp3", 22050, 32),
    "mp3_24000_48": OutputFormat("mp3", 24000, 48),
    "mp3_44100_32": OutputFormat("mp3", 44100, 32),
    "mp3_44100_64": OutputFormat("mp3", 44100, 64),
    "mp3_44100_96": OutputFormat("mp3", 44100, 96),
    "mp3_44100_128": OutputFormat("mp3", 44100, 128),
    "mp3_44100_192": OutputFormat("mp3", 44100, 192),
    "pcm_8000": OutputFormat("pcm", 8000),
    "pcm_16000": OutputFormat("pcm", 16000),
    "pcm_22050": OutputFormat("pcm", 22050),
    "pcm_24000": OutputFormat("pcm", 24000),
    "pcm_44100": OutputFormat("pcm", 44100),
    "pcm_48000": OutputFormat("pcm", 48000),
}


class VoiceSettings(BaseModel):
    model_config = ConfigDict(extra="ignore")

    stability: float | None = Field(None, ge=0, le=1)
    similarity_boost: float | None = Field(None, ge=0, le=1)
    style: float | None = Field(None, ge=0, le=1)
    use_speaker_boost: bool | None = None
    speed: float | None = Field(None, ge=0.7, le=1.2)


class SpeechBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str = Field(min_length=1)
    model_id: str = "eleven_multilingual_v2"
    voice_settings: VoiceSettings | None = None
    language_code: str | None = None
    seed: int | None = Field(None, ge=0, le=4294967295)
    previous_text: str | None = None
    next_text: str | None = None


class Refusal(Exception):
    """An ElevenLabs-style refusal: status, and `detail` (a dict, or FastAPI's list)."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail


def refusal(status: int, code: str, message: str) -> Refusal:
    return Refusal(status, {"status": code, "message": message})


FAULT_ERRORS: dict[int, tuple[str, str]] = {
    429: (
        "system_busy",
        "The system is experiencing heavy traffic, please try again (simulated fault).",
    ),
    500: ("internal_server_error", "An internal error occurred (simulated fault)."),
    503: ("service_unavailable", "The service is temporarily unavailable (simulated fault)."),
}


def fault_refusal(status: int) -> Refusal:
    if status in FAULT_ERRORS:
        return refusal(status, *FAULT_ERRORS[status])
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return refusal(status, phrase.lower().replace(" ", "_").replace("-", "_"), f"{phrase} (simulated fault).")


def schema_errors(error: ValidationError) -> list[dict[str, Any]]:
    """pydantic's errors as FastAPI reports a request body that does not fit (through
    pydantic's own JSON, so that inputs such as undecodable bytes serialise)."""
    return [
        {"type": problem["type"], "loc": ["body", *problem["loc"]], "msg": problem["msg"], "input": problem["input"]}
        for problem in orjson.loads(error.json(include_url=False))
    ]


class ElevenLabs:
    def __init__(self, settings: SimSettings, state: SimState) -> None:
        self.api_key = settings.elevenlabs_api_key.get_secret_value() if settings.elevenlabs_api_key else None
        self.max_concurrent = settings.elevenlabs_max_concurrent
        self.state = state
        self.in_flight = 0
        self.espeak_command = settings.espeak_command if settings.uses_espeak else None
        self.lame_command = settings.lame_command if settings.uses_lame else None
        self.latency = Latency(settings)

    def routes(self) -> list[Route]:
        async def whole(call: Call) -> Response:
            return await self.speech(call, streaming=False)

        async def stream(call: Call) -> Response:
            return await self.speech(call, streaming=True)

        return [
            Route("/v1/text-to-speech/{voice_id}", provider_endpoint("speech", self.state, whole), methods=["POST"]),
            Route(
                "/v1/text-to-speech/{voice_id}/stream",
                provider_endpoint("speech", self.state, stream),
                methods=["POST"],
            ),
        ]

    def headers(self, rid: str) -> dict[str, str]:
        return {
            "request-id": rid,
            "current-concurrent-requests": str(self.in_flight),
            "maximum-concurrent-requests": str(self.max_concurrent),
        }

    async def speech(self, call: Call, streaming: bool) -> Response:
        rid = uuid.uuid4().hex
        key = call.request.headers.get("xi-api-key")
        if not key:
            return self.refuse(
                refusal(401, "needs_authorization", "Neither authorization header nor xi-api-key received."), rid
            )
        if self.api_key is not None and key != self.api_key:
            return self.refuse(refusal(401, "invalid_api_key", "Invalid API key"), rid)
        self.in_flight += 1
        held = True  # the slot, until the answer is sent (a stream keeps it while it lasts)
        try:
            if self.in_flight > self.max_concurrent:
                raise refusal(
                    429,
                    "too_many_concurrent_requests",
                    f"Too many concurrent requests. Your current subscription is associated with a maximum "
                    f"of {self.max_concurrent} concurrent requests (running in parallel).",
                )
            if not await call.read_body(MAX_JSON_BODY):
                raise refusal(413, "request_too_large", "The request body is too large.")
            if not await call.wait():
                return Response(status_code=CLIENT_CLOSED)
            if call.error_status is not None:
                raise fault_refusal(call.error_status)
            response = await self.synthesise(call, rid, streaming)
            if isinstance(response, PacedStream):
                response.on_close = self.release
                held = False
            return response
        except Refusal as error:
            return self.refuse(error, rid)
        finally:
            if held:
                self.release()

    def release(self) -> None:
        self.in_flight -= 1

    def refuse(self, error: Refusal, rid: str) -> JSONResponse:
        return JSONResponse({"detail": error.detail}, error.status, headers=self.headers(rid))

    async def synthesise(self, call: Call, rid: str, streaming: bool) -> Response:
        voice_id = call.request.path_params["voice_id"]
        if not VOICE_ID.fullmatch(voice_id):
            raise refusal(404, "voice_not_found", f"A voice with the voice_id {voice_id} was not found.")
        format_name = call.request.query_params.get("output_format", DEFAULT_OUTPUT_FORMAT)
        output = OUTPUT_FORMATS.get(format_name)
        if output is None:
            raise refusal(
                422,
                "invalid_output_format",
                f"Invalid output format {format_name!r}; the simulator supports {', '.join(OUTPUT_FORMATS)}.",
            )
        try:
            body = SpeechBody.model_validate_json(call.body)
        except ValidationError as error:
            raise Refusal(422, schema_errors(error)) from None
        if len(body.text) > MAX_TEXT_CHARACTERS:
            raise refusal(
                400,
                "text_too_long",
                f"This request's text has {len(body.text)} characters and exceeds the character limit "
                f"of {MAX_TEXT_CHARACTERS} characters.",
            )
        if body.model_id not in MODELS:
            raise refusal(400, "model_not_found", f"A model with model ID {body.model_id} does not exist.")
        try:
            sound, seconds = await asyncio.to_thread(self.render, body.text, output)
        except (audio.SpeechError, mp3.Mp3Error) as error:
            logger.error("speech synthesis failed", extra={"error": str(error)})
            raise refusal(500, "internal_server_error", "Speech synthesis failed in the simulator.") from None
        headers = {**self.headers(rid), "character-cost": str(len(body.text)), "content-type": output.media_type}
        pace = self.latency.speech(body.model_id)
        if streaming:
            return PacedStream(paced_audio(sound, seconds, output, pace), headers, call.cut)
        if not await call.pause(pace.ready_at(seconds)):
            return Response(status_code=CLIENT_CLOSED)
        return call.finish(Response(sound, headers=headers))

    def render(self, text: str, output: OutputFormat) -> tuple[bytes, float]:
        """The audio for `text` and how long it plays, in a worker thread: espeak-ng and
        lame run as processes, and resampling long speech in Python takes a while."""
        if output.codec == "pcm":
            pcm = self.pcm(text, output.rate)
            return pcm, pcm_seconds(pcm, output.rate)
        if self.lame_command is not None:
            pcm = self.pcm(text, output.rate)
            return mp3.lame_mp3(pcm, output.rate, output.kbps, self.lame_command), pcm_seconds(pcm, output.rate)
        if self.espeak_command is not None:
            seconds = pcm_seconds(self.pcm(text, output.rate), output.rate)
        else:
            seconds = audio.tone_seconds(text)
        return mp3.silent_mp3(seconds, output.rate, output.kbps), seconds

    def pcm(self, text: str, rate: int) -> bytes:
        if self.espeak_command is not None:
            return audio.espeak_pcm(text, rate, self.espeak_command)
        return audio.tone_pcm(text, rate)


def pcm_seconds(pcm: bytes, rate: int) -> float:
    return len(pcm) / (2 * rate)


def paced_audio(sound: bytes, seconds: float, output: OutputFormat, pace: SpeechPace) -> list[tuple[float, bytes]]:
    """The audio in pieces that play on their own (whole MP3 frames, whole PCM samples),
    each when the audio up to its end is synthesised: the first within the TTFB, the
    rest at the synthesis speed."""
    if output.codec == "mp3":
        pieces = mp3.frame_chunks(sound, STREAM_CHUNK_BYTES)
    else:  # an even size: whole 16-bit samples
        pieces = [sound[start : start + STREAM_CHUNK_BYTES] for start in range(0, len(sound), STREAM_CHUNK_BYTES)]
    seconds_per_byte = seconds / len(sound) if sound else 0.0
    timed: list[tuple[float, bytes]] = []
    ready = 0
    first = len(pieces[0]) if pieces else 0
    for piece in pieces:
        ready += len(piece)
        timed.append((pace.ready_at((ready - first) * seconds_per_byte), piece))
    return timed
