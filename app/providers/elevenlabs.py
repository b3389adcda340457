"""ElevenLabs text-to-speech, whole or streamed.

https://elevenlabs.io/docs/api-reference/text-to-speech/convert -
`POST {base}/v1/text-to-speech/{voice_id}?output_format=...` with `xi-api-key`, JSON
`{text, model_id}`; the body of the answer is the audio. At most 5,000 characters a call.
https://elevenlabs.io/docs/api-reference/text-to-speech/stream -
`POST {base}/v1/text-to-speech/{voice_id}/stream`, the same request; the audio comes
chunked as it is synthesised. Every call takes its deadline: the seconds it may take in
all, retries included, and for a stream its last byte too. The characters sent are
counted (what ElevenLabs bills) once the answer's head says it is audio: ElevenLabs bills
the request, so a stream that breaks off later has been billed all the same.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import httpx
from prometheus_client import Counter

from app.outbound import DEADLINE_EXTENSION
from app.providers.errors import ProviderRejected
from app.providers.http import ends_at, exchange, next_piece

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
        _check(text)
        response = await exchange(
            PROVIDER,
            lambda: self.client.post(
                f"v1/text-to-speech/{voice_id}",
                params={"output_format": output_format},
                json={"text": text, "model_id": model},
                extensions={DEADLINE_EXTENSION: deadline},
            ),
        )
        content_type = _audio_type(response)
        if not response.content:
            raise ProviderRejected(PROVIDER, "answer is not audio")
        self.characters.labels(model).inc(len(text))
        return response.content, content_type

    async def speak_stream(
        self, text: str, *, voice_id: str, model: str, output_format: str, deadline: float
    ) -> AsyncGenerator[bytes, None]:
        """The audio as it is synthesised: an async generator of the body's pieces as they
        arrive (not cut at frame boundaries), which join to what `speak` returns.

        Nothing is sent until the first piece is asked for. Refusals raise as in `speak`,
        a head that is not audio with ProviderRejected; a stream that breaks off, goes
        silent past the read timeout or runs past `deadline` raises ProviderUnavailable
        after the pieces it gave. A consumer stopping early must close the generator
        (`contextlib.aclosing`), which closes the response. The content type is the
        output format's (`audio/mpeg`, `audio/pcm`).
        """
        _check(text)
        until = ends_at(deadline)
        request = self.client.build_request(
            "POST",
            f"v1/text-to-speech/{voice_id}/stream",
            params={"output_format": output_format},
            json={"text": text, "model_id": model},
            extensions={DEADLINE_EXTENSION: deadline},
        )
        response = await exchange(PROVIDER, lambda: self.client.send(request, stream=True))
        try:
            _audio_type(response)
            self.characters.labels(model).inc(len(text))
            pieces = response.aiter_bytes()
            received = False
            while (piece := await next_piece(PROVIDER, pieces, until)) is not None:
                received = True
                yield piece
            if not received:
                raise ProviderRejected(PROVIDER, "answer is not audio")
        finally:
            await response.aclose()


def content_type_of(output_format: str) -> str:
    """The media type of an output format's audio (`mp3_44100_128` is MP3): what
    `speak_stream` sends, known before it starts."""
    codec = output_format.split("_", 1)[0]
    return {"mp3": "audio/mpeg", "pcm": "audio/pcm", "ulaw": "audio/basic", "opus": "audio/ogg"}.get(
        codec, "application/octet-stream"
    )


def _check(text: str) -> None:
    if not text or len(text) > MAX_CHARACTERS:
        raise ProviderRejected(PROVIDER, "text must be 1 to 5000 characters")


def _audio_type(response: httpx.Response) -> str:
    content_type: str = response.headers.get("content-type", "").split(";")[0].strip()
    if not content_type.startswith("audio/"):
        raise ProviderRejected(PROVIDER, "answer is not audio")
    return content_type
