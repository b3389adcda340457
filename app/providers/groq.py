"""Groq: chat completions and Whisper transcriptions, on its OpenAI-compatible REST API.

https://console.groq.com/docs/api-reference - `POST {base}/chat/completions` and
`POST {base}/audio/transcriptions` (multipart `file`, `model`), bearer-token auth. The
base URL (`GROQ_BASE_URL`) ends in `/openai/v1`. Every call takes its deadline: the
seconds it may take in all, retries included.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

import httpx

from app.outbound import DEADLINE_EXTENSION
from app.providers.errors import ProviderRejected
from app.providers.http import exchange

PROVIDER = "groq"


class ChatMessage(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


class Groq:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

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
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ProviderRejected(PROVIDER, "unexpected chat response shape") from None
        if not isinstance(content, str):
            raise ProviderRejected(PROVIDER, "chat response without text")
        return content.strip()

    async def transcribe(self, model: str, audio: bytes, filename: str, content_type: str, *, deadline: float) -> str:
        files = {"file": (filename, audio, content_type)}
        data = {"model": model, "response_format": "json"}
        response = await exchange(
            PROVIDER,
            lambda: self.client.post(
                "audio/transcriptions", files=files, data=data, extensions={DEADLINE_EXTENSION: deadline}
            ),
        )
        try:
            text = response.json()["text"]
        except (ValueError, KeyError, TypeError):
            raise ProviderRejected(PROVIDER, "unexpected transcription response shape") from None
        return str(text).strip()
