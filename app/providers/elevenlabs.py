"""ElevenLabs text-to-speech.

https://elevenlabs.io/docs/api-reference/text-to-speech/convert -
`POST {base}/v1/text-to-speech/{voice_id}?output_format=...` with `xi-api-key`, JSON
`{text, model_id}`; the body of the answer is the audio. At most 5,000 characters a call.
Every call takes its deadline: the seconds it may take in all, retries included.
"""

from __future__ import annotations

import httpx
from prometheus_client import Counter

from app.outbound import DEADLINE_EXTENSION
from app.providers.errors import ProviderRejected
from app.providers.http import exchange

PROVIDER = "elevenlabs"
MAX_CHARACTERS = 5000


class ElevenLabs:
    def __init__(self, client: httpx.AsyncClient, characters: Counter) -> None:
        self.client = client
        self.characters = characters  # by model: what ElevenLabs bills

    async def speak(
        self, text: str, *, voice_id: str, model: str, output_format: str, deadline: float
    ) -> tuple[bytes, str]:
        """The audio and its content type."""
        if not text or len(text) > MAX_CHARACTERS:
            raise ProviderRejected(PROVIDER, "text must be 1 to 5000 characters")
        response = await exchange(
            PROVIDER,
            lambda: self.client.post(
                f"v1/text-to-speech/{voice_id}",
                params={"output_format": output_format},
                json={"text": text, "model_id": model},
                extensions={DEADLINE_EXTENSION: deadline},
            ),
        )
        content_type = response.headers.get("content-type", "").split(";")[0].strip()
        if not response.content or not content_type.startswith("audio/"):
            raise ProviderRejected(PROVIDER, "answer is not audio")
        self.characters.labels(model).inc(len(text))
        return response.content, content_type
