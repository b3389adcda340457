"""Groq: chat completions and Whisper transcriptions, on its OpenAI-compatible REST API.

https://console.groq.com/docs/api-reference - `POST {base}/chat/completions` and
`POST {base}/audio/transcriptions` (multipart `file`, `model`), bearer-token auth. The
base URL (`GROQ_BASE_URL`) ends in `/openai/v1`. Every call takes its deadline: the
seconds it may take in all, retries included. What Groq bills is counted for the quota
panels and alerts (docs/metrics.md): the tokens its `usage` reports, and the audio seconds
a `verbose_json` transcription reports as its `duration`.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

import httpx
from prometheus_client import Counter

from app.outbound import DEADLINE_EXTENSION
from app.providers.errors import ProviderRejected
from app.providers.http import exchange

PROVIDER = "groq"


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
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "temperature": 0.7 if not json_object else 0.0,
            "max_completion_tokens": max_tokens,
        }
        if json_object:
            body["response_format"] = {"type": "json_object"}
        response = await exchange(
            PROVIDER,
            lambda: self.client.post("chat/completions", json=body, extensions={DEADLINE_EXTENSION: deadline}),
        )
        try:
            answer = response.json()
            content = answer["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ProviderRejected(PROVIDER, "unexpected chat response shape") from None
        usage = answer.get("usage") if isinstance(answer, dict) else None
        if isinstance(usage, dict):
            for direction, field in (("input", "prompt_tokens"), ("output", "completion_tokens")):
                if isinstance(usage.get(field), int):
                    self.tokens.labels(model, direction).inc(usage[field])
        if not isinstance(content, str):
            raise ProviderRejected(PROVIDER, "chat response without text")
        return content.strip()

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
