"""Groq: chat completions, streamed or whole, and Whisper transcriptions, on its
OpenAI-compatible REST API.

https://console.groq.com/docs/api-reference - `POST {base}/chat/completions` (JSON, or
with `"stream": true` server-sent events: `data: <chat.completion.chunk>` per delta, the
last chunk with the `finish_reason` and the usage in `x_groq.usage`, then `data: [DONE]`)
and `POST {base}/audio/transcriptions` (multipart `file`, `model`), bearer-token auth. The
base URL (`GROQ_BASE_URL`) ends in `/openai/v1`. Every call takes its deadline: the
seconds it may take in all, retries included, and for a stream its last byte too. What
Groq bills is counted for the quota panels and alerts (docs/metrics.md): the tokens its
`usage` reports, and the audio seconds a `verbose_json` transcription reports as its
`duration`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from contextlib import suppress
from typing import Any, Literal, TypedDict

import httpx
from prometheus_client import Counter

from app.outbound import DEADLINE_EXTENSION
from app.providers.errors import ProviderError, ProviderRejected, ProviderUnavailable
from app.providers.http import ends_at, exchange, next_piece

PROVIDER = "groq"

DONE = b"[DONE]"
MAX_EVENT_BYTES = 1 << 20  # one event's data; Groq's are well under a kilobyte
# After [DONE], how long the end of the body is waited for: read, it lets the connection
# back into the pool (a new one costs a TLS handshake); the reply is complete either way.
DRAIN_SECONDS = 0.5


class ChatMessage(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


class Groq:
    def __init__(self, client: httpx.AsyncClient, tokens: Counter, audio_seconds: Counter) -> None:
        self.client = client
        self.tokens = tokens  # by model, direction
        self.audio_seconds = audio_seconds  # by model

    async def chat(
        self,
        model: str,
        messages: list[ChatMessage],
        *,
        deadline: float,
        json_object: bool = False,
        max_tokens: int = 512,
    ) -> str:
        body = _chat_body(model, messages, json_object=json_object, max_tokens=max_tokens)
        response = await exchange(
            PROVIDER,
            lambda: self.client.post("chat/completions", json=body, extensions={DEADLINE_EXTENSION: deadline}),
        )
        try:
            answer = response.json()
            content = answer["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ProviderRejected(PROVIDER, "unexpected chat response shape") from None
        self._count(model, answer.get("usage") if isinstance(answer, dict) else None)
        if not isinstance(content, str):
            raise ProviderRejected(PROVIDER, "chat response without text")
        return content.strip()

    async def chat_stream(
        self, model: str, messages: list[ChatMessage], *, deadline: float, max_tokens: int = 512
    ) -> AsyncGenerator[str, None]:
        """The reply's text as it is made: an async generator of content deltas, which join
        to what `chat` returns for the same messages (whitespace at either end held back).

        Nothing is sent until the first delta is asked for. A refusal then raises as `chat`
        does; a stream that breaks off, goes silent past the read timeout, runs past
        `deadline`, sends an event that is not a chunk, or ends without `[DONE]` raises
        ProviderUnavailable after the deltas it gave. A consumer stopping early must close
        the generator (`contextlib.aclosing`), which closes the response. Tokens are
        counted when the chunk with the usage arrives (`x_groq.usage`, or a top-level
        `usage`); a stream cut before it counts none.
        """
        until = ends_at(deadline)
        body = {**_chat_body(model, messages, json_object=False, max_tokens=max_tokens), "stream": True}
        request = self.client.build_request(
            "POST", "chat/completions", json=body, extensions={DEADLINE_EXTENSION: deadline}
        )
        response = await exchange(PROVIDER, lambda: self.client.send(request, stream=True))
        events = _Events()
        text = _Trimmed()
        counted = False
        pieces = response.aiter_bytes()
        try:
            done = False
            while not done:
                piece = await next_piece(PROVIDER, pieces, until)
                if piece is None:
                    raise ProviderUnavailable(PROVIDER, "stream ended before [DONE]")
                for data in events.feed(piece):
                    if data == DONE:
                        done = True
                        break
                    delta, usage = _chunk(data)
                    if usage is not None and not counted:
                        counted = True
                        self._count(model, usage)
                    if out := text.push(delta):
                        yield out
            drain_until = min(until, ends_at(DRAIN_SECONDS))
            with suppress(ProviderError):
                while await next_piece(PROVIDER, pieces, drain_until) is not None:
                    pass
        finally:
            await response.aclose()

    async def transcribe(self, model: str, audio: bytes, filename: str, content_type: str, *, deadline: float) -> str:
        files = {"file": (filename, audio, content_type)}
        data = {"model": model, "response_format": "verbose_json"}
        response = await exchange(
            PROVIDER,
            lambda: self.client.post(
                "audio/transcriptions", files=files, data=data, extensions={DEADLINE_EXTENSION: deadline}
            ),
        )
        try:
            answer = response.json()
            text = answer["text"]
        except (ValueError, KeyError, TypeError):
            raise ProviderRejected(PROVIDER, "unexpected transcription response shape") from None
        duration = answer.get("duration")
        if isinstance(duration, int | float) and duration > 0:
            self.audio_seconds.labels(model).inc(duration)
        return str(text).strip()

    def _count(self, model: str, usage: object) -> None:
        if isinstance(usage, dict):
            for direction, field in (("input", "prompt_tokens"), ("output", "completion_tokens")):
                if isinstance(usage.get(field), int):
                    self.tokens.labels(model, direction).inc(usage[field])


def _chat_body(model: str, messages: list[ChatMessage], *, json_object: bool, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "temperature": 0.7 if not json_object else 0.0,
        "max_completion_tokens": max_tokens,
    }
    if json_object:
        body["response_format"] = {"type": "json_object"}
    return body


def _chunk(data: bytes) -> tuple[str, dict[str, Any] | None]:
    """A `chat.completion.chunk`'s content delta ("" if none) and usage (None if none)."""
    try:
        chunk = json.loads(data)
    except ValueError:
        raise ProviderUnavailable(PROVIDER, "malformed stream event") from None
    if not isinstance(chunk, dict):
        raise ProviderUnavailable(PROVIDER, "malformed stream event")
    if "error" in chunk:  # how an OpenAI-style stream reports a failure after its head
        raise ProviderUnavailable(PROVIDER, "error event in stream")
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise ProviderUnavailable(PROVIDER, "malformed stream event")
    content = ""
    if choices:  # an OpenAI-style usage chunk has none
        delta = choices[0].get("delta") if isinstance(choices[0], dict) else None
        if not isinstance(delta, dict):
            raise ProviderUnavailable(PROVIDER, "malformed stream event")
        given = delta.get("content") or ""
        if not isinstance(given, str):
            raise ProviderUnavailable(PROVIDER, "malformed stream event")
        content = given
    groq = chunk.get("x_groq")
    usage = groq.get("usage") if isinstance(groq, dict) else None
    if not isinstance(usage, dict):
        usage = chunk.get("usage")
    return content, usage if isinstance(usage, dict) else None


class _Events:
    """The data of each server-sent event in a byte stream
    (https://html.spec.whatwg.org/multipage/server-sent-events.html): lines end in LF or
    CRLF (Groq's; a lone CR is not taken as an end), `data:` lines join with LF, an empty
    line ends the event; comments and the other fields are skipped."""

    def __init__(self) -> None:
        self._partial = b""
        self._data: list[bytes] = []
        self._size = 0

    def feed(self, piece: bytes) -> list[bytes]:
        """The data of every event `piece` completes."""
        *lines, self._partial = (self._partial + piece).split(b"\n")
        completed: list[bytes] = []
        for line in lines:
            line = line.removesuffix(b"\r")
            if not line:
                if self._data:
                    completed.append(b"\n".join(self._data))
                    self._data, self._size = [], 0
                continue
            field, _, value = line.partition(b":")
            if field == b"data":
                value = value.removeprefix(b" ")
                self._data.append(value)
                self._size += len(value)
        if self._size + len(self._partial) > MAX_EVENT_BYTES:
            raise ProviderUnavailable(PROVIDER, "malformed stream event")
        return completed


class _Trimmed:
    """Deltas joined as `chat` returns the whole reply, stripped: leading whitespace is
    dropped, and trailing whitespace held back until text follows it."""

    def __init__(self) -> None:
        self._started = False
        self._held = ""

    def push(self, delta: str) -> str:
        """What of the reply can be given out now ("" if nothing)."""
        if not self._started:
            delta = delta.lstrip()
            if not delta:
                return ""
            self._started = True
        text = delta.rstrip()
        if not text:
            self._held += delta
            return ""
        out = self._held + text
        self._held = delta[len(text) :]
        return out
