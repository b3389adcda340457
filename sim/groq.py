"""Groq's OpenAI-compatible API, the two endpoints the app uses:

- `POST /openai/v1/chat/completions` (JSON, or server-sent events with `stream: true`);
- `POST /openai/v1/audio/transcriptions` (multipart upload, Whisper models).

Errors come in OpenAI's shape, `{"error": {"message", "type", "code"}}`, every response
carries `x-request-id`, and answered calls carry Groq's `x-ratelimit-*` headers.
"""

from __future__ import annotations

import base64
import hashlib
import math
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import orjson
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from common.audio import duration_seconds
from sim import containers, replies
from sim.latency import ChatPace, Latency
from sim.pipeline import CLIENT_CLOSED, Call, PacedStream, SimState, provider_endpoint
from sim.ratelimit import Budgets
from sim.settings import SimSettings

CHAT_MODELS = frozenset(
    {
        "llama-3.3-70b-versatile",
        "llama-3.1-8b-instant",
        "meta-llama/llama-4-scout-17b-16e-instruct",
        "meta-llama/llama-4-maverick-17b-128e-instruct",
        "openai/gpt-oss-20b",
        "openai/gpt-oss-120b",
        "qwen/qwen3-32b",
    }
)
TRANSCRIPTION_MODELS = frozenset({"whisper-large-v3", "whisper-large-v3-turbo"})
ROLES = frozenset({"system", "user", "assistant"})

MAX_JSON_BODY = 4 * 1024 * 1024
MAX_AUDIO_BYTES = 25 * 1024 * 1024  # Groq's cap on an uploaded file (free tier)
MAX_UPLOAD_BODY = MAX_AUDIO_BYTES + 1024 * 1024  # the file plus the other form fields
TRANSCRIPTION_FORMATS = frozenset({"json", "text", "verbose_json"})
CHARACTERS_PER_TOKEN = 4
SYSTEM_FINGERPRINT = "fp_simulator"
SSE = "text/event-stream"  # server-sent events

JSON = dict[str, Any]


class GroqError(Exception):
    """A refusal in Groq's words; raised by validation, turned into the response."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.error_type = error_type


def request_id() -> str:
    """Like Groq's: `req_` and 26 base-32 characters."""
    return "req_" + base64.b32encode(uuid.uuid4().bytes).decode().rstrip("=").lower()


def error_response(error: GroqError, rid: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body: JSON = {"message": error.message, "type": error.error_type}
    if error.param is not None:
        body["param"] = error.param
    if error.code is not None:
        body["code"] = error.code
    return JSONResponse({"error": body}, error.status, headers={**(headers or {}), "x-request-id": rid})


# A fault's status in Groq's words: (code, message).
FAULT_ERRORS: dict[int, tuple[str, str]] = {
    429: ("rate_limit_exceeded", "Rate limit reached (simulated fault). Please try again in 1s."),
    498: ("capacity_exceeded", "Capacity exceeded (simulated fault): the service tier is at capacity."),
    500: ("internal_server_error", "Internal Server Error (simulated fault)."),
    502: ("bad_gateway", "Bad Gateway (simulated fault)."),
    503: ("service_unavailable", "Service Unavailable (simulated fault). Please try again later."),
    504: ("gateway_timeout", "Gateway Timeout (simulated fault)."),
}


def status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def fault_error(status: int) -> tuple[GroqError, dict[str, str]]:
    if status in FAULT_ERRORS:
        code, message = FAULT_ERRORS[status]
    else:
        phrase = status_phrase(status)
        code, message = phrase.lower().replace(" ", "_").replace("-", "_"), f"{phrase} (simulated fault)."
    error_type = "invalid_request_error" if status < 500 and status != 498 else "internal_server_error"
    if status == 429:
        error_type = "requests"
    headers = {"retry-after": "1"} if status == 429 else {}
    return GroqError(status, message, code, error_type=error_type), headers


class Groq:
    def __init__(self, settings: SimSettings, state: SimState) -> None:
        self.api_key = settings.groq_api_key.get_secret_value() if settings.groq_api_key else None
        self.state = state
        self.budgets = Budgets(settings.groq_requests_per_minute, settings.groq_tokens_per_minute)
        self.latency = Latency(settings)

    def routes(self) -> list[Route]:
        return [
            Route(
                "/openai/v1/chat/completions",
                provider_endpoint("chat", self.state, self.chat),
                methods=["POST"],
            ),
            Route(
                "/openai/v1/audio/transcriptions",
                provider_endpoint("transcribe", self.state, self.transcribe),
                methods=["POST"],
            ),
        ]

    def check_key(self, call: Call) -> None:
        scheme, _, key = call.request.headers.get("authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key or (self.api_key is not None and key != self.api_key):
            raise GroqError(401, "Invalid API Key", "invalid_api_key")

    async def answer(self, call: Call, body_limit: int) -> Response | None:
        """The steps before the endpoint's own work: key, body, delay, fault."""
        self.check_key(call)
        if not await call.read_body(body_limit):
            raise GroqError(413, "Request Entity Too Large", "request_too_large")
        if not await call.wait():
            return Response(status_code=CLIENT_CLOSED)
        if call.error_status is not None:
            error, headers = fault_error(call.error_status)
            return error_response(error, request_id(), headers)
        return None

    # -- chat completions ----------------------------------------------------------------------------

    async def chat(self, call: Call) -> Response:
        rid = request_id()
        try:
            early = await self.answer(call, MAX_JSON_BODY)
            if early is not None:
                return early
            chat = parse_chat(call.body)
            reply = self.complete(chat, rid)
            if isinstance(reply, Response):
                return reply
            pace = self.latency.chat(chat.model)
            if chat.stream:
                return PacedStream(reply.events(pace), reply.headers(SSE), call.cut)
            if not await call.pause(pace.total(reply.completion_tokens)):
                return Response(status_code=CLIENT_CLOSED)
            return call.finish(JSONResponse(reply.completion(), headers=reply.headers()))
        except GroqError as error:
            return error_response(error, rid)

    def complete(self, chat: ChatRequest, rid: str) -> Reply | Response:
        """The reply to `chat`, charged to its model's budget; a 429 when it does not fit."""
        self.state.chats.append(replies.context(chat.messages, chat.json_mode))
        content = replies.json_reply(chat.messages) if chat.json_mode else replies.text_reply(chat.messages)
        prompt_tokens = estimate_tokens("".join(m.content for m in chat.messages))
        completion_tokens = estimate_tokens(content)
        finish_reason = "stop"
        if chat.max_tokens is not None and completion_tokens > chat.max_tokens:
            if chat.json_mode:
                raise GroqError(
                    400,
                    "Failed to generate JSON within max_tokens. Please adjust your prompt or max_tokens.",
                    "json_validate_failed",
                )
            content = content[: chat.max_tokens * CHARACTERS_PER_TOKEN]
            completion_tokens = chat.max_tokens
            finish_reason = "length"
        verdict = self.budgets.charge(chat.model, prompt_tokens + completion_tokens)
        if not verdict.allowed:
            headers = {**verdict.headers, "retry-after": str(verdict.retry_after_seconds)}
            error = GroqError(
                429,
                f"Rate limit reached for model `{chat.model}` on {verdict.exhausted} per minute. "
                f"Please try again in {verdict.retry_after_seconds}s.",
                "rate_limit_exceeded",
                error_type=verdict.exhausted,
            )
            return error_response(error, rid, headers)
        return Reply(rid, chat.model, content, finish_reason, prompt_tokens, completion_tokens, verdict.headers)

    # -- transcriptions ------------------------------------------------------------------------------

    async def transcribe(self, call: Call) -> Response:
        rid = request_id()
        try:
            early = await self.answer(call, MAX_UPLOAD_BODY)
            if early is not None:
                return early
            return call.finish(await self.transcript(call, rid))
        except GroqError as error:
            return error_response(error, rid)

    async def transcript(self, call: Call, rid: str) -> Response:
        fields = await parse_form(call)
        try:
            return await self.transcribe_form(call, fields, rid)
        finally:
            await fields.close()

    async def transcribe_form(self, call: Call, fields: FormData, rid: str) -> Response:
        model = text_field(fields, "model", required=True)
        if model not in TRANSCRIPTION_MODELS:
            raise GroqError(
                404, f"The model `{model}` does not exist or you do not have access to it.", "model_not_found"
            )
        if "url" in fields:
            raise GroqError(400, "'url' is not supported by the simulator: upload a file", param="url")
        upload = fields.get("file")
        if not isinstance(upload, UploadFile):
            raise GroqError(400, "'file' must be provided as a file upload", param="file")
        name, dot, extension = (upload.filename or "").rpartition(".")
        extension = extension.lower() if dot and name else ""
        if extension not in containers.EXTENSIONS:
            allowed = " ".join(containers.EXTENSIONS)
            raise GroqError(400, f"file must be one of the following types: [{allowed}]", "invalid_file_type", "file")
        data = await upload.read()
        if len(data) > MAX_AUDIO_BYTES:
            raise GroqError(413, "Request Entity Too Large: the audio file is over 25 MiB", "request_too_large", "file")
        if not data:
            raise GroqError(400, "the audio file is empty", "empty_file", "file")
        if not containers.matches(extension, data):
            raise GroqError(400, "file extension does not match content", "invalid_file_format", "file")
        response_format = text_field(fields, "response_format") or "json"
        if response_format not in TRANSCRIPTION_FORMATS:
            raise GroqError(
                400,
                f"response_format must be one of {', '.join(sorted(TRANSCRIPTION_FORMATS))}",
                param="response_format",
            )
        language = text_field(fields, "language")
        if language is not None and not (2 <= len(language) <= 3 and language.isalpha()):
            raise GroqError(400, "language must be an ISO-639-1 code such as 'en'", param="language")
        temperature = text_field(fields, "temperature")
        if temperature is not None and not is_number_between(temperature, 0, 1):
            raise GroqError(400, "temperature must be a number between 0 and 1", param="temperature")
        prompt = text_field(fields, "prompt")
        # Measured too where the headers are silent (MediaRecorder's WebM), as a decoder would.
        seconds = duration_seconds(data, containers.EXTENSIONS[extension], measure=True)
        if seconds is None:
            raise GroqError(400, "could not process file - is it a valid media file?", param="file")
        text = prompt if prompt is not None else byte_transcript(data, seconds)

        verdict = self.budgets.charge(model, 0)
        headers = {**verdict.headers, "x-request-id": rid}
        if not verdict.allowed:
            headers["retry-after"] = str(verdict.retry_after_seconds)
            error = GroqError(
                429,
                f"Rate limit reached for model `{model}` on requests per minute. "
                f"Please try again in {verdict.retry_after_seconds}s.",
                "rate_limit_exceeded",
                error_type="requests",
            )
            return error_response(error, rid, headers)
        if not await call.pause(self.latency.transcription_seconds(model, seconds)):
            return Response(status_code=CLIENT_CLOSED)
        if response_format == "text":
            return PlainTextResponse(text, headers=headers)
        if response_format == "verbose_json":
            duration = round(seconds, 2)
            segment = {"id": 0, "seek": 0, "start": 0.0, "end": duration, "text": text, "tokens": []}
            verbose = {
                "task": "transcribe",
                "language": language or "en",
                "duration": duration,
                "text": text,
                "segments": [segment],
                "x_groq": {"id": rid},
            }
            return JSONResponse(verbose, headers=headers)
        return JSONResponse({"text": text, "x_groq": {"id": rid}}, headers=headers)


# -- request parsing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[replies.Message]
    json_mode: bool
    max_tokens: int | None
    stream: bool


@dataclass
class Reply:
    """A chat completion's answer, sent whole (`completion`) or as server-sent events
    (`events`): the same content and usage either way."""

    rid: str
    model: str
    content: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    rate_limit_headers: dict[str, str]
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4()}")
    created: int = field(default_factory=lambda: int(time.time()))

    def headers(self, content_type: str | None = None) -> dict[str, str]:
        extra = {} if content_type is None else {"content-type": content_type}
        return {**self.rate_limit_headers, "x-request-id": self.rid, **extra}

    def usage(self) -> JSON:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def completion(self) -> JSON:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.content},
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                }
            ],
            "usage": self.usage(),
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "x_groq": {"id": self.rid},
        }

    def pieces(self) -> list[str]:
        """The content in token-sized pieces, one per CHARACTERS_PER_TOKEN characters: as
        many as `completion_tokens` counts."""
        size = CHARACTERS_PER_TOKEN
        return [self.content[start : start + size] for start in range(0, len(self.content), size)]

    def events(self, pace: ChatPace) -> list[tuple[float, bytes]]:
        """The stream as Groq sends it, each event with its time: the role first (with the
        first token), one event per token, then the finish reason with the usage in
        `x_groq.usage` (Groq's timings included), then `[DONE]`."""
        pieces = self.pieces()
        first = self.chunk({"role": "assistant", "content": ""}, x_groq={"id": self.rid})
        events = [(pace.token_at(0), first)]
        events += [(pace.token_at(index), self.chunk({"content": piece})) for index, piece in enumerate(pieces)]
        prompt_time = pace.token_at(0)
        total_time = pace.total(len(pieces))
        usage = {
            "queue_time": 0.0,
            "prompt_time": round(prompt_time, 6),
            "completion_time": round(total_time - prompt_time, 6),
            "total_time": round(total_time, 6),
            **self.usage(),
        }
        last = self.chunk({}, self.finish_reason, {"id": self.rid, "usage": usage})
        events.append((total_time, last + b"data: [DONE]\n\n"))
        return events

    def chunk(self, delta: JSON, finish_reason: str | None = None, x_groq: JSON | None = None) -> bytes:
        body: JSON = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if x_groq is not None:
            body["x_groq"] = x_groq
        return b"data: " + orjson.dumps(body) + b"\n\n"


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / CHARACTERS_PER_TOKEN))


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_number_between(text: str, low: float, high: float) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return low <= value <= high


def parse_chat(body: bytes) -> ChatRequest:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise GroqError(400, "We could not parse the JSON body of your request.", "invalid_json") from None
    if not isinstance(data, dict):
        raise GroqError(400, "The request body must be a JSON object.", "invalid_json")

    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise GroqError(400, "'model' : property 'model' is missing or not a string", param="model")
    if model not in CHAT_MODELS:
        raise GroqError(404, f"The model `{model}` does not exist or you do not have access to it.", "model_not_found")

    raw_messages = data.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise GroqError(400, "'messages' : must be a non-empty array", param="messages")
    messages: list[replies.Message] = []
    for index, item in enumerate(raw_messages):
        if not isinstance(item, dict):
            raise GroqError(400, f"'messages.{index}' : must be an object", param="messages")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise GroqError(
                400,
                f"'messages.{index}.role' : must be one of system, user, assistant (got {role!r})",
                param="messages",
            )
        if not isinstance(content, str):
            raise GroqError(400, f"'messages.{index}.content' : must be a string", param="messages")
        messages.append(replies.Message(role, content))

    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise GroqError(400, "'stream' : must be a boolean", param="stream")

    temperature = data.get("temperature")
    if temperature is not None and not (is_number(temperature) and 0 <= temperature <= 2):
        raise GroqError(400, "'temperature' : must be a number between 0 and 2", param="temperature")
    top_p = data.get("top_p")
    if top_p is not None and not (is_number(top_p) and 0 <= top_p <= 1):
        raise GroqError(400, "'top_p' : must be a number between 0 and 1", param="top_p")
    n = data.get("n")
    if n is not None and n != 1:
        raise GroqError(400, "'n' : number must be at most 1", param="n")

    max_tokens: int | None = None
    for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins
        value = data.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise GroqError(400, f"'{name}' : must be a positive integer", param=name)
        max_tokens = value

    json_mode = False
    response_format = data.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind not in ("text", "json_object"):
            raise GroqError(
                400,
                "'response_format.type' : must be 'text' or 'json_object' in the simulator",
                param="response_format",
            )
        json_mode = kind == "json_object"
    return ChatRequest(model, messages, json_mode, max_tokens, stream is True)


async def parse_form(call: Call) -> FormData:
    content_type = call.request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise GroqError(400, "the request must be multipart/form-data", "invalid_content_type")

    async def body() -> AsyncGenerator[bytes, None]:
        yield call.body

    try:
        return await MultiPartParser(call.request.headers, body(), max_files=4, max_fields=32).parse()
    except MultiPartException as error:
        raise GroqError(400, f"could not parse the multipart body: {error.message}") from None


def text_field(fields: FormData, name: str, required: bool = False) -> str | None:
    value = fields.get(name)
    if value is None:
        if required:
            raise GroqError(400, f"'{name}' : property '{name}' is missing", param=name)
        return None
    if not isinstance(value, str):
        raise GroqError(400, f"'{name}' must be a text field, not a file", param=name)
    return value


def byte_transcript(data: bytes, seconds: float) -> str:
    digest = hashlib.sha256(data).hexdigest()[:8]
    return f"Sim transcript {digest}: the speaker talked for about {max(1, round(seconds))} seconds."
