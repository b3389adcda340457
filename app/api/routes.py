"""The API under /api/v1: sessions, turns, reply audio, health and readiness. Everything
is asked of `Companion` (`app.state.companion`). What writes - starting a session, a
turn, a deletion - is answered 507 `storage_full` when the disk or the database has no
room for it (`app.storage.full`, docs/app.md#when-the-disk-is-full)."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from app.api import models
from app.api.errors import ApiError
from app.audio import AudioFormat, AudioRejected, inspect_upload
from app.companion import (
    Companion,
    NoSpeech,
    ReplyUnavailable,
    SessionBusy,
    SessionNotFound,
    TranscriptionUnavailable,
    TurnResult,
    TurnTimedOut,
)
from app.memory.store import MemoryUnavailable
from app.observability import INTERNAL_ERROR
from app.settings import AppSettings
from app.storage.full import storage_full
from app.workflow.state import Conversation
from common.envelope import envelope
from common.logs import request_id_var

logger = logging.getLogger("app.api")

# The prefix on the router, not on its inclusion: then each route's own path is the whole
# template, which the server span names (`http.route`) instead of the path with its ids.
router = APIRouter(prefix="/api/v1")

# Beyond the audio itself, what a multipart body may carry (boundaries, part headers).
MULTIPART_ALLOWANCE = 64 * 1024
TEXT_BODY_LIMIT = 256 * 1024

# A full disk is not freed within seconds: a client asked to come back, not to hammer.
STORAGE_FULL_RETRY_AFTER_S = 60
NO_ROOM_FOR_SESSION = "The server has no room to start a conversation right now. Please try again later."
NO_ROOM_FOR_TURN = (
    "The server has no room to store this turn right now; nothing you already had is lost. Please try again later."
)
NO_ROOM_FOR_DELETION = "The server has no room to finish deleting the conversation right now. Please try again later."

AUDIO_REJECTION_STATUS = {
    "audio_empty": 400,
    "audio_too_large": 413,
    "audio_unsupported": 415,
    "audio_undecodable": 422,
    "audio_too_long": 422,
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": models.ErrorEnvelope} for status in statuses}


def companion_of(request: Request) -> Companion:
    companion: Companion = request.app.state.companion
    return companion


def audio_url(audio_id: str | None) -> str | None:
    return f"/api/v1/audio/{audio_id}" if audio_id else None


@router.post(
    "/sessions",
    status_code=201,
    response_model=models.SessionCreated,
    responses=error_responses(507),
    tags=["sessions"],
)
async def create_session(request: Request) -> models.SessionCreated:
    """Starts a conversation. The session id is unguessable: whoever holds it can continue
    the conversation, read it and delete it. 507 `storage_full` with `Retry-After` if there
    is no room to store it."""
    with _storage_full_answered("a new session", NO_ROOM_FOR_SESSION):
        session_id, created_at = await companion_of(request).create_session()
    return models.SessionCreated(session_id=session_id, created_at=created_at)


@router.get("/sessions/{session_id}", response_model=models.Session, responses=error_responses(404), tags=["sessions"])
async def get_session(session_id: str, request: Request) -> models.Session:
    """The session and its messages, oldest first. 404 if the id is unknown or malformed."""
    conversation = await _session(request, session_id)
    return models.Session(
        session_id=conversation["session_id"],
        created_at=conversation["created_at"],
        updated_at=conversation.get("updated_at", conversation["created_at"]),
        messages=[
            models.SessionMessage(
                role=message["role"],
                text=message["text"],
                at=message["at"],
                audio_url=audio_url(message.get("audio_id")),
            )
            for message in conversation.get("messages", [])
        ],
    )


@router.delete("/sessions/{session_id}", status_code=204, responses=error_responses(404, 503, 507), tags=["sessions"])
async def delete_session(session_id: str, request: Request) -> Response:
    """Deletes the session with everything it left: conversation state, long-term
    memories and reply audio. A turn under way ends first. 503 if the memory store cannot
    be reached, or the turn under way does not end within APP_TURN_TIMEOUT_S: nothing is
    deleted then, so that nothing is left behind; try again. 507 `storage_full` with
    `Retry-After` if the database has no room to record the deletion: try again later."""
    try:
        with _storage_full_answered("a deletion", NO_ROOM_FOR_DELETION):
            await companion_of(request).delete_session(session_id)
    except SessionNotFound:
        raise _not_found() from None
    except MemoryUnavailable:
        raise ApiError(
            503, "memory_unavailable", "The session cannot be deleted completely right now. Please try again."
        ) from None
    except SessionBusy:
        raise ApiError(
            503, "session_busy", "The session is busy with a turn. Please try again.", headers={"retry-after": "5"}
        ) from None
    return Response(status_code=204)


TURN_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": models.TextTurn.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["audio"],
                    "properties": {"audio": {"type": "string", "format": "binary"}},
                }
            },
        },
    }
}


@router.post(
    "/sessions/{session_id}/turns",
    response_model=models.TurnResult,
    openapi_extra=TURN_REQUEST_BODY,
    responses={
        200: {
            "content": {
                "text/event-stream": {
                    "schema": {"type": "string"},
                    "description": "With `Accept: text/event-stream`: the turn as server-sent events - "
                    "`transcript`, `reply` deltas, `audio` chunks, then `done` (this document) or `error` "
                    "(the envelope).",
                }
            }
        },
        **error_responses(400, 404, 413, 415, 422, 503, 504, 507),
    },
    tags=["turns"],
)
async def take_turn(session_id: str, request: Request, response: Response) -> models.TurnResult | StreamingResponse:
    """One turn of the conversation: the person speaks (or types), the companion answers.

    Send either JSON `{"text": "..."}` (1 to APP_MAX_TEXT_CHARS characters after trimming)
    or `multipart/form-data` with the recording in the field `audio`. The audio format is
    read from the bytes - WAV, MP3, OGG/Opus, WebM/Opus, M4A/MP4 or FLAC - whatever the
    file name says. Refused: an empty file (400), over APP_MAX_AUDIO_BYTES (413), another
    format (415), a broken file or one longer than APP_MAX_AUDIO_SECONDS (422), speech with
    no words in it (422).

    The answer has the transcript, the reply, and the reply as speech (`audio_url`, null
    if speech synthesis was unavailable). `degraded` lists what was skipped: `memory`,
    `speech`. When the transcriber is unavailable a voice turn gets 503
    `transcription_unavailable` (text turns still work); when the language model is
    unavailable, 503 `reply_unavailable` with `Retry-After` - the person's words are kept
    in the session. A turn that takes longer than APP_TURN_TIMEOUT_S gets 504 and leaves
    the session as it was. When the disk or the database has no room for what the turn
    makes, 507 `storage_full` with `Retry-After`, and the session as it was.

    With `Accept: text/event-stream` the turn streams as server-sent events: `transcript`
    `{"text"}`, `reply` `{"delta"}` as the model writes, `audio` `{"seq", "content_type",
    "data"}` (base64, one playable MP3 per sentence, while the next is written), then `done`
    with this same document, or `error` with the envelope a refusal above would have had.
    What is refused before the turn starts (bad input, unknown session) keeps its status.
    """
    companion = companion_of(request)
    settings = companion.settings
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    turn_input: dict[str, Any]
    if content_type == "application/json":
        turn_input = {"text": await _text_turn(request, settings)}
    elif content_type == "multipart/form-data":
        audio = await _voice_turn_audio(request, settings)
        audio_format, _ = _inspect(audio, settings)
        turn_input = {"audio": audio, "audio_format": audio_format}
    else:
        raise ApiError(415, "unsupported_media_type", 'Send JSON {"text": ...} or multipart/form-data with `audio`.')
    if _wants_events(request):
        await _session(request, session_id)  # an unknown session is a 404, not a stream
        return StreamingResponse(
            _turn_events(companion.stream_turn(session_id, **turn_input)),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )
    with _turn_refusals():
        result = await companion.take_turn(session_id, **turn_input)
    # The stages where browsers' developer tools and the edge's access log show them.
    response.headers["server-timing"] = ", ".join(f"{stage};dur={ms:g}" for stage, ms in result.timings_ms.items())
    return _turn_document(result)


def _turn_document(result: TurnResult) -> models.TurnResult:
    return models.TurnResult(
        turn_id=result.turn_id,
        transcript=result.transcript,
        reply=result.reply,
        audio_url=audio_url(result.audio_id),
        degraded=result.degraded,
        timings_ms=result.timings_ms,
    )


def _wants_events(request: Request) -> bool:
    accepted = (part.split(";")[0].strip().lower() for part in request.headers.get("accept", "").split(","))
    return "text/event-stream" in accepted


@contextmanager
def _turn_refusals() -> Iterator[None]:
    """A turn that could not be answered, as the error the API answers it with."""
    try:
        with _storage_full_answered("a turn", NO_ROOM_FOR_TURN):
            yield
    except SessionNotFound:  # also one deleted while the turn waited for it
        raise _not_found() from None
    except TranscriptionUnavailable:
        raise ApiError(
            503,
            "transcription_unavailable",
            "Voice can't be understood right now. Please try again shortly, or type your message.",
            headers={"retry-after": "5"},
        ) from None
    except NoSpeech:
        raise ApiError(422, "no_speech", "No words were heard in the recording.") from None
    except ReplyUnavailable as unavailable:
        raise ApiError(
            503,
            "reply_unavailable",
            "A reply can't be given right now; your message was kept. Please try again shortly.",
            headers={"retry-after": str(max(1, math.ceil(unavailable.retry_after)))},
        ) from None
    except TurnTimedOut:
        raise ApiError(504, "turn_timeout", "The reply took too long; nothing was changed. Please try again.") from None


async def _turn_events(events: AsyncIterator[tuple[str, dict[str, Any] | TurnResult]]) -> AsyncIterator[bytes]:
    """A streaming turn as server-sent events (docs/app.md#the-streaming-turn): each step's
    results as they come, then `done` with the JSON turn's document, or `error` with the
    envelope its refusal would have had."""
    try:
        with _turn_refusals():
            async for name, data in events:
                if isinstance(data, TurnResult):
                    data = _turn_document(data).model_dump(mode="json")
                yield _event(name, orjson.dumps(data))
    except ApiError as refused:
        yield _event("error", envelope(refused.code, refused.message, request_id_var.get(), refused.details))
    except Exception:
        logger.exception("streaming turn failed")
        yield _event("error", envelope("internal_error", INTERNAL_ERROR, request_id_var.get()))


def _event(name: str, data: bytes) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


@router.get(
    "/audio/{audio_id}",
    response_class=Response,
    responses={200: {"content": {"audio/mpeg": {}}}, **error_responses(404)},
    tags=["audio"],
)
async def get_audio(audio_id: str, request: Request) -> Response:
    """A reply's speech, with its real content type. Ids are 32 lower-case hex digits;
    audio is kept for APP_AUDIO_RETENTION_HOURS."""
    found = await companion_of(request).find_audio(audio_id)
    if found is None:
        raise _not_found()
    return Response(found.content, media_type=found.content_type)


@router.get("/health", response_model=models.Liveness, tags=["operations"])
async def health() -> models.Liveness:
    """Liveness: the process answers. Dependencies are `/ready`'s business."""
    return models.Liveness(status="alive")


@router.get(
    "/ready",
    response_model=models.Readiness,
    responses={503: {"model": models.Readiness}},
    tags=["operations"],
)
async def ready(request: Request) -> Response:
    """Readiness: a real query on the conversation database and on the memory store (with
    long-term memory on), the breaker state of each outside service by name (never its
    address: the body is public), and the feature flags the process started with. 503
    when the database is down; the memory store and the providers are reported but do not
    fail readiness - turns degrade without them."""
    companion = companion_of(request)
    readiness = await companion.readiness()
    checks: dict[Literal["database", "memory", "embedder"], Literal["up", "down"]] = {
        "database": "up" if readiness.database else "down"
    }
    memory = companion.services.memory
    if readiness.memory is not None and memory is not None:
        checks["memory"] = "up" if readiness.memory else "down"
        # Loaded before the app served; down when the store holds vectors it cannot use.
        checks["embedder"] = "up" if memory.refusal is None else "down"
    settings = companion.settings
    body = models.Readiness(
        status="ready" if readiness.database else "unavailable",
        checks=checks,
        breakers=readiness.breakers,
        features=models.Features(
            memory=settings.feature_memory,
            speech=settings.feature_speech,
            summaries=settings.feature_summaries,
            api_docs=settings.feature_api_docs,
        ),
    )
    return Response(
        body.model_dump_json(),
        status_code=200 if readiness.database else 503,
        media_type="application/json",
        headers={"cache-control": "no-store"},
    )


# -- helpers ------------------------------------------------------------------------------------


async def _session(request: Request, session_id: str) -> Conversation:
    try:
        return await companion_of(request).session(session_id)
    except SessionNotFound:
        raise _not_found() from None


def _not_found() -> ApiError:
    return ApiError(404, "not_found", "There is no such session or audio.")


@contextmanager
def _storage_full_answered(what: str, message: str) -> Iterator[None]:
    """A full disk or database met within as 507 `storage_full`: `message` says what did not
    happen, and the envelope nothing else (the error's text may name a file, by its id).
    One error line, naming what was refused and no id."""
    try:
        yield
    except Exception as error:
        if not storage_full(error):
            raise
        logger.error("no room left to store %s: the disk or the database is full (%s)", what, type(error).__name__)
        raise ApiError(507, "storage_full", message, headers={"retry-after": str(STORAGE_FULL_RETRY_AFTER_S)}) from None


async def _read_capped(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", "The request body is too large.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "body_too_large", "The request body is too large.")
    return bytes(body)


async def _text_turn(request: Request, settings: AppSettings) -> str:
    raw = await _read_capped(request, TEXT_BODY_LIMIT)
    try:
        turn = models.TextTurn.model_validate_json(raw)
    except ValidationError as error:
        details = [
            {"field": ".".join(str(part) for part in problem["loc"]), "problem": problem["msg"]}
            for problem in error.errors()
        ]
        raise ApiError(422, "invalid_request", 'Send JSON {"text": "..."}.', details=details) from None
    text = turn.text.strip()
    if not text:
        raise ApiError(422, "text_empty", "The message is empty.")
    if len(text) > settings.max_text_chars:
        raise ApiError(422, "text_too_long", f"The message is longer than {settings.max_text_chars} characters.")
    return text


async def _voice_turn_audio(request: Request, settings: AppSettings) -> bytes:
    limit = settings.max_audio_bytes + MULTIPART_ALLOWANCE
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "audio_too_large", f"The recording is larger than {settings.max_audio_bytes} bytes.")
    try:
        form = await request.form(max_files=1, max_fields=4)
    except HTTPException:  # Starlette's answer to a body its multipart parser refuses
        raise ApiError(400, "invalid_request", "The upload is not valid multipart/form-data.") from None
    upload = form.get("audio")
    if not isinstance(upload, UploadFile):
        raise ApiError(422, "audio_missing", "Send the recording in the form field `audio`.")
    return await upload.read(settings.max_audio_bytes + 1)


def _inspect(audio: bytes, settings: AppSettings) -> tuple[AudioFormat, float | None]:
    try:
        return inspect_upload(audio, max_bytes=settings.max_audio_bytes, max_seconds=settings.max_audio_seconds)
    except AudioRejected as rejected:
        raise ApiError(AUDIO_REJECTION_STATUS.get(rejected.code, 422), rejected.code, rejected.message) from None
