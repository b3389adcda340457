"""The provider simulator over real HTTP on loopback: Groq's chat completions and
transcriptions, ElevenLabs' text-to-speech, the `/_sim/` fault API, and `python -m sim`.

One simulator serves the module (reset before every test); tests that need other settings
start their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from sim import audio
from sim.settings import SimSettings
from tests.servers import ServerThread, closed_port, wait_until
from tests.sim_support import (
    CHAT_PATH,
    CONTAINER_SAMPLES,
    ELEVEN_KEY,
    FAKE_ESPEAK_RATE,
    FAKE_MP3,
    VOICE,
    chat_body,
    client,
    eleven_headers,
    environment_without_sim,
    fake_espeak,
    fake_lame,
    groq_headers,
    logged_calls,
    parse_mp3_frames,
    running_sim,
    upload,
    wav_file,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The developer's own SIM_ variables must not change what these tests see.
for _name in list(os.environ):
    if _name.startswith("SIM_"):
        del os.environ[_name]


def chat(http: httpx.Client, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return http.post(CHAT_PATH, json=body, headers=groq_headers() if headers is None else headers)


def speak(
    http: httpx.Client,
    text: str = "Hello there",
    output_format: str | None = None,
    *,
    stream: bool = False,
    headers: dict[str, str] | None = None,
    voice: str = VOICE,
    **extra: Any,
) -> httpx.Response:
    path = f"/v1/text-to-speech/{voice}" + ("/stream" if stream else "")
    params = {"output_format": output_format} if output_format else None
    body = {"text": text, "model_id": "eleven_flash_v2_5", **extra}
    return http.post(path, params=params, json=body, headers=eleven_headers() if headers is None else headers)


def content_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


def add_fault(http: httpx.Client, **fault: Any) -> None:
    response = http.post("/_sim/faults", json=fault)
    assert response.status_code == 201, response.text


def calls(http: httpx.Client) -> dict[str, Any]:
    result: dict[str, Any] = http.get("/_sim/calls").json()
    return result


def chats(http: httpx.Client) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = http.get("/_sim/chats").json()["chats"]
    return result


# -- Groq: authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {'gsk_test_key'}"}, {"authorization": "Bearer"}],
    ids=["missing", "wrong-key", "not-bearer", "empty"],
)
def test_chat_refuses_a_missing_or_wrong_key(http: httpx.Client, headers: dict[str, str]) -> None:
    response = chat(http, chat_body(("user", "hi")), headers)
    assert response.status_code == 401
    assert response.json() == {
        "error": {"message": "Invalid API Key", "type": "invalid_request_error", "code": "invalid_api_key"}
    }
    assert response.headers["x-request-id"].startswith("req_")


def test_transcription_refuses_a_missing_key(http: httpx.Client) -> None:
    response = upload(http, wav_file(0.5), headers={})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_without_a_configured_key_any_bearer_key_is_accepted() -> None:
    with running_sim(groq_api_key=None, elevenlabs_api_key=None) as server, client(server) as http:
        assert chat(http, chat_body(("user", "hi")), groq_headers("anything")).status_code == 200
        assert speak(http, headers=eleven_headers("anything")).status_code == 200
        assert chat(http, chat_body(("user", "hi")), {}).status_code == 401  # a key is still required
        assert speak(http, headers={}).json()["detail"]["status"] == "needs_authorization"


# -- Groq: chat validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (chat_body(("user", "hi"), model="llama-9-imaginary"), 404, "model_not_found", None),
        (chat_body(("user", "hi"), model="whisper-large-v3"), 404, "model_not_found", None),
        ({"messages": [{"role": "user", "content": "hi"}]}, 400, None, "model"),
        ({"model": "llama-3.1-8b-instant"}, 400, None, "messages"),
        (chat_body(), 400, None, "messages"),
        (chat_body(("tool", "hi")), 400, None, "messages"),
        ({"model": "llama-3.1-8b-instant", "messages": [{"role": "user", "content": 5}]}, 400, None, "messages"),
        ({"model": "llama-3.1-8b-instant", "messages": ["hi"]}, 400, None, "messages"),
        (chat_body(("user", "hi"), stream="yes"), 400, None, "stream"),
        (chat_body(("user", "hi"), temperature=2.5), 400, None, "temperature"),
        (chat_body(("user", "hi"), temperature="hot"), 400, None, "temperature"),
        (chat_body(("user", "hi"), max_tokens=0), 400, None, "max_tokens"),
        (chat_body(("user", "hi"), max_completion_tokens=True), 400, None, "max_completion_tokens"),
        (chat_body(("user", "hi"), response_format={"type": "json_schema"}), 400, None, "response_format"),
        (chat_body(("user", "hi"), response_format="json"), 400, None, "response_format"),
        (chat_body(("user", "hi"), n=2), 400, None, "n"),
        ([1, 2], 400, "invalid_json", None),
    ],
    ids=[
        "unknown-model",
        "transcription-model",
        "no-model",
        "no-messages",
        "empty-messages",
        "bad-role",
        "content-not-text",
        "message-not-object",
        "stream-not-boolean",
        "temperature-range",
        "temperature-type",
        "max-tokens-zero",
        "max-completion-tokens-bool",
        "response-format-type",
        "response-format-string",
        "n",
        "not-an-object",
    ],
)
def test_chat_validates_like_groq(
    http: httpx.Client, body: Any, status: int, code: str | None, param: str | None
) -> None:
    response = chat(http, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert error.get("code") == code
    assert error.get("param") == param


def test_chat_refuses_a_body_that_is_not_json(http: httpx.Client) -> None:
    response = http.post(CHAT_PATH, content=b"{not json", headers=groq_headers())
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


# -- Groq: deterministic replies ------------------------------------------------------------------------

CONVERSATION = chat_body(
    ("system", "You are Rose, a kind companion.\n\nMemories:\n- The user has a dog named Rex.\n- The user likes tea."),
    ("user", "Hello"),
    ("assistant", "Hi! How are you?"),
    ("user", "A bit tired today"),
    ("assistant", "I am sorry to hear that."),
    ("user", "Tell me something nice"),
)


def test_chat_reply_answers_the_user_and_the_simulator_keeps_its_context(http: httpx.Client) -> None:
    response = chat(http, CONVERSATION)
    completion = response.json()
    assert completion["object"] == "chat.completion"
    assert completion["id"].startswith("chatcmpl-")
    assert completion["model"] == "llama-3.3-70b-versatile"
    assert isinstance(completion["created"], int)
    choice = completion["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": "I see. Tell me more about that.",
    }
    assert chats(http) == [{"kind": "reply", "said": "Tell me something nice", "messages": 4, "memories": 2}]
    assert choice["finish_reason"] == "stop"
    prompt_chars = sum(len(m["content"]) for m in CONVERSATION["messages"])
    usage = completion["usage"]
    assert usage["prompt_tokens"] == -(-prompt_chars // 4)
    assert usage["completion_tokens"] == -(-len(choice["message"]["content"]) // 4)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_same_request_same_reply(http: httpx.Client) -> None:
    first, second = chat(http, CONVERSATION).json(), chat(http, CONVERSATION).json()
    assert first["choices"] == second["choices"]
    assert first["usage"] == second["usage"]
    assert first["id"] != second["id"]  # ids are per call, as Groq's are


def test_memory_lines_count_only_under_a_memories_heading(http: httpx.Client) -> None:
    system = "Rules:\n- be kind\n- be brief\n\nMemories:\n- Likes jazz.\n- Lives in Oslo.\n- Has a cat.\nEnd."
    content = content_of(chat(http, chat_body(("system", system), ("user", "hey"))))
    assert content == "Hello again! How are you today?"  # memories: they have met
    assert chats(http)[-1]["memories"] == 3


def test_summary_prompt_gets_a_summary(http: httpx.Client) -> None:
    long_text = "word " * 100
    body = chat_body(
        ("system", "Summarise the conversation below in a few sentences."),
        ("user", "I went to the park."),
        ("assistant", "That sounds lovely."),
        ("user", long_text),
    )
    content = content_of(chat(http, body))
    spoken = " ".join(["I went to the park.", "That sounds lovely.", long_text])
    assert content == "Summary: " + spoken[:300]


def test_max_tokens_cuts_a_text_reply(http: httpx.Client) -> None:
    completion = chat(http, chat_body(("user", "Tell me a long story please"), max_tokens=3)).json()
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == "I see. Tell "  # 3 tokens of 4 characters
    assert completion["usage"]["completion_tokens"] == 3


PERSONA = "You are Rose, a warm companion."
REMEMBERED = "Memories:\n- The user's sister lives in Paris.\n- The user loves hiking in the mountains."


@pytest.mark.parametrize(
    ("system", "said", "reply"),
    [
        (PERSONA, "Hello!", "Hello, I'm Rose. How are you today?"),
        (f"{PERSONA}\n\n{REMEMBERED}", "Hi there", "Hello again! How are you today?"),
        (
            PERSONA,
            "Hello there. I love hiking, and my sister lives in Paris.",
            "Hello, I'm Rose. You love hiking, and your sister lives in Paris. "
            "Thank you for telling me, I'll keep that in mind.",
        ),
        (
            f"{PERSONA}\n\n{REMEMBERED}",
            "What do you remember about me?",
            "I remember that your sister lives in Paris and you love hiking in the mountains.",
        ),
        (
            f"{PERSONA}\n\n{REMEMBERED}",
            "Do you remember where my sister lives?",
            "I remember that your sister lives in Paris.",
        ),
        (
            PERSONA,
            "What do you remember about me?",
            "I don't remember anything about you yet. Tell me about yourself and I'll keep it in mind.",
        ),
        (
            PERSONA,
            "I am tired and I was up late.",
            "You are tired and you were up late. Thank you for telling me, I'll keep that in mind.",
        ),
        (PERSONA, "Are you there?", "Yes, I'm here and listening."),
        (
            PERSONA,
            "What is the capital of Peru?",
            "That's a good question. I'm the companion's offline simulation, so I can't really answer it, "
            "but I'm glad to keep talking.",
        ),
        (PERSONA, "It rained all day.", "I see. Tell me more about that."),
    ],
    ids=[
        "greeting",
        "greeting-again",
        "statement",
        "recall-all",
        "recall-asked",
        "recall-nothing",
        "i-am",
        "are-you-there",
        "question",
        "other",
    ],
)
def test_chat_reply_makes_sense_of_what_the_prompt_gives(
    http: httpx.Client, system: str, said: str, reply: str
) -> None:
    assert content_of(chat(http, chat_body(("system", system), ("user", said)))) == reply


def test_every_answered_chat_call_is_listed_with_its_kind_until_a_reset(http: httpx.Client) -> None:
    chat(http, chat_body(("system", "Summarise this conversation."), ("user", "We talked.")))
    memory = chat_body(("system", "Extract a fact worth keeping in memory."), ("user", "I like tea"))
    chat(http, {**memory, "response_format": {"type": "json_object"}})
    chat(http, chat_body(("system", REMEMBERED), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")))
    assert chats(http) == [
        {"kind": "summary", "said": "We talked.", "messages": 0, "memories": 0},
        {"kind": "json", "said": "I like tea", "messages": 0, "memories": 0},
        {"kind": "reply", "said": "Bye", "messages": 2, "memories": 2},
    ]
    assert http.post("/_sim/reset").status_code == 200
    assert chats(http) == []


MEMORY_PROMPT = "Decide whether the message holds a fact worth keeping in long-term memory. Answer in JSON."


@pytest.mark.parametrize(
    ("message", "fact"),
    [
        ("I love hiking with my dog", "The user loves hiking with their dog."),
        ("Hello! I love hiking. Is it sunny?", "The user loves hiking."),
        ("My sister lives in Lisbon", "The user's sister lives in Lisbon."),
        ("I'm a nurse and I work nights", "The user is a nurse and the user works nights."),
        ("I have two kids.", "The user has two kids."),
        ("What is my name?", None),
        ("The weather is lovely today", None),
        ("", None),
    ],
)
def test_json_mode_memory_analysis(http: httpx.Client, message: str, fact: str | None) -> None:
    body = chat_body(
        ("system", MEMORY_PROMPT),
        ("user", message),
        model="llama-3.1-8b-instant",
        response_format={"type": "json_object"},
    )
    assert json.loads(content_of(chat(http, body))) == {"fact": fact}


def test_json_mode_without_a_memory_prompt_echoes(http: httpx.Client) -> None:
    body = chat_body(("system", "Reply in JSON."), ("user", "I love tea"), response_format={"type": "json_object"})
    assert json.loads(content_of(chat(http, body))) == {"text": "I love tea"}


def test_json_mode_that_cannot_fit_max_tokens_fails_like_groq(http: httpx.Client) -> None:
    body = chat_body(("system", MEMORY_PROMPT), ("user", "I love tea"), response_format={"type": "json_object"})
    response = chat(http, {**body, "max_completion_tokens": 1})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "json_validate_failed"


# -- Groq: rate-limit headers -----------------------------------------------------------------------

RESET = re.compile(r"^(\d+m)?\d+(\.\d+)?s$")


def test_rate_limit_headers_count_down(http: httpx.Client) -> None:
    first = chat(http, chat_body(("user", "one")))
    second = chat(http, chat_body(("user", "two")))
    for response in (first, second):
        assert response.headers["x-ratelimit-limit-requests"] == "1000"
        assert response.headers["x-ratelimit-limit-tokens"] == "100000"
        assert RESET.match(response.headers["x-ratelimit-reset-requests"])
        assert RESET.match(response.headers["x-ratelimit-reset-tokens"])
        assert response.headers["x-request-id"].startswith("req_")
    assert first.headers["x-ratelimit-remaining-requests"] == "999"
    assert second.headers["x-ratelimit-remaining-requests"] == "998"
    spent = first.json()["usage"]["total_tokens"] + second.json()["usage"]["total_tokens"]
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == 100_000 - spent
    # Budgets are per model, as Groq's are.
    other = chat(http, chat_body(("user", "three"), model="llama-3.1-8b-instant"))
    assert other.headers["x-ratelimit-remaining-requests"] == "999"


def test_spent_budget_answers_429_with_retry_after() -> None:
    with running_sim(groq_requests_per_minute=2) as server, client(server) as http:
        statuses = [chat(http, chat_body(("user", "hi"))).status_code for _ in range(2)]
        refused = chat(http, chat_body(("user", "hi")))
    assert statuses == [200, 200]
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(refused.headers["retry-after"]) <= 60


def test_token_budget_is_enforced_too() -> None:
    with running_sim(groq_tokens_per_minute=50) as server, client(server) as http:
        refused = chat(http, chat_body(("user", "x" * 400)))
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "tokens"


# -- Groq: transcriptions -----------------------------------------------------------------------------


def test_prompt_field_becomes_the_transcript(http: httpx.Client) -> None:
    said = "I adopted a cat named Miso last week."
    response = upload(http, wav_file(1.0), prompt=said)
    assert response.status_code == 200, response.text
    assert response.json()["text"] == said
    assert response.headers["x-ratelimit-remaining-requests"] == "999"


def test_transcript_is_derived_from_the_bytes(http: httpx.Client) -> None:
    audio_a, audio_b = wav_file(2.0, seed=1), wav_file(2.0, seed=2)
    first, again, other = (upload(http, data).json()["text"] for data in (audio_a, audio_a, audio_b))
    digest = hashlib.sha256(audio_a).hexdigest()[:8]
    assert first == f"Sim transcript {digest}: the speaker talked for about 2 seconds."
    assert again == first
    assert other != first


def test_transcript_formats(http: httpx.Client) -> None:
    text = upload(http, wav_file(1.5), response_format="text", prompt="hello there")
    assert text.status_code == 200
    assert text.headers["content-type"].startswith("text/plain")
    assert text.text == "hello there"
    verbose = upload(http, wav_file(1.5), response_format="verbose_json", language="de").json()
    assert verbose["task"] == "transcribe"
    assert verbose["language"] == "de"
    assert verbose["duration"] == 1.5
    assert verbose["text"].startswith("Sim transcript ")
    assert verbose["segments"][0]["end"] == 1.5


@pytest.mark.parametrize("extension", sorted(CONTAINER_SAMPLES))
def test_every_groq_extension_is_accepted_with_matching_bytes(http: httpx.Client, extension: str) -> None:
    response = upload(http, CONTAINER_SAMPLES[extension], f"clip.{extension.upper()}")
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("content", "filename", "fields", "status", "code"),
    [
        (CONTAINER_SAMPLES["webm"], "speech.wav", {}, 400, "invalid_file_format"),
        (CONTAINER_SAMPLES["wav"], "speech.webm", {}, 400, "invalid_file_format"),
        (CONTAINER_SAMPLES["ogg"], "speech.mp3", {}, 400, "invalid_file_format"),
        (b"just some text", "speech.mp3", {}, 400, "invalid_file_format"),
        (CONTAINER_SAMPLES["wav"], "speech.txt", {}, 400, "invalid_file_type"),
        (CONTAINER_SAMPLES["wav"], "speech", {}, 400, "invalid_file_type"),
        (b"", "speech.wav", {}, 400, "empty_file"),
        (CONTAINER_SAMPLES["wav"], "speech.wav", {"model": "whisper-tiny"}, 404, "model_not_found"),
        (CONTAINER_SAMPLES["wav"], "speech.wav", {"model": ""}, 400, None),
        (CONTAINER_SAMPLES["wav"], "speech.wav", {"response_format": "srt"}, 400, None),
        (CONTAINER_SAMPLES["wav"], "speech.wav", {"language": "english!"}, 400, None),
        (CONTAINER_SAMPLES["wav"], "speech.wav", {"temperature": "7"}, 400, None),
    ],
    ids=[
        "webm-named-wav",
        "wav-named-webm",
        "ogg-named-mp3",
        "text-named-mp3",
        "unknown-extension",
        "no-extension",
        "empty",
        "unknown-model",
        "no-model",
        "response-format",
        "language",
        "temperature",
    ],
)
def test_transcription_validates_like_groq(
    http: httpx.Client, content: bytes, filename: str, fields: dict[str, str], status: int, code: str | None
) -> None:
    response = upload(http, content, filename, fields=fields)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error.get("code") == code
    if code == "invalid_file_format":
        assert error["message"] == "file extension does not match content"


def test_transcription_needs_a_multipart_file(http: httpx.Client) -> None:
    no_file = http.post(
        "/openai/v1/audio/transcriptions", headers=groq_headers(), files={"model": (None, "whisper-large-v3")}
    )
    assert no_file.status_code == 400
    assert no_file.json()["error"]["param"] == "file"
    as_json = http.post("/openai/v1/audio/transcriptions", headers=groq_headers(), json={"model": "whisper-large-v3"})
    assert as_json.status_code == 400


def test_uploads_are_capped_at_25_mib(http: httpx.Client) -> None:
    header = CONTAINER_SAMPLES["wav"][:44]
    limit = 25 * 1024 * 1024
    assert upload(http, header + bytes(limit - 44), prompt="fits").status_code == 200
    over = upload(http, header + bytes(limit - 43))
    assert over.status_code == 413
    assert over.json()["error"]["code"] == "request_too_large"
    # Far over: refused from the body size, after reading it, so the client sees the 413.
    assert upload(http, header + bytes(limit + 4 * 1024 * 1024)).status_code == 413


# -- ElevenLabs ----------------------------------------------------------------------------------------


def test_speech_refuses_a_missing_or_wrong_key(http: httpx.Client) -> None:
    missing = speak(http, headers={})
    assert missing.status_code == 401
    assert missing.json()["detail"]["status"] == "needs_authorization"
    wrong = speak(http, headers=eleven_headers("nope"))
    assert wrong.status_code == 401
    assert wrong.json()["detail"]["status"] == "invalid_api_key"
    assert wrong.json()["detail"]["message"]


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"voice": "not-a-voice"}, 404, "voice_not_found"),
        ({"voice": "21m00Tcm4TlvDq8ikWA"}, 404, "voice_not_found"),
        ({"output_format": "wav_44100"}, 422, "invalid_output_format"),
        ({"output_format": "mp3_44100_999"}, 422, "invalid_output_format"),
        ({"text": "x" * 5001}, 400, "text_too_long"),
        ({"model_id": "eleven_imaginary_v9"}, 400, "model_not_found"),
    ],
    ids=["bad-voice", "short-voice", "wav-format", "bad-bitrate", "text-too-long", "unknown-model"],
)
def test_speech_refusals_like_elevenlabs(http: httpx.Client, kwargs: dict[str, Any], status: int, code: str) -> None:
    response = speak(http, **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["detail"]["status"] == code
    assert response.headers["maximum-concurrent-requests"] == "3"


@pytest.mark.parametrize(
    ("body", "location"),
    [
        ({"model_id": "eleven_flash_v2_5"}, ["body", "text"]),
        ({"text": ""}, ["body", "text"]),
        ({"text": 42}, ["body", "text"]),
        ({"text": "hi", "voice_settings": {"stability": 2}}, ["body", "voice_settings", "stability"]),
        ({"text": "hi", "voice_settings": {"speed": 3.0}}, ["body", "voice_settings", "speed"]),
    ],
    ids=["no-text", "empty-text", "text-not-string", "stability", "speed"],
)
def test_speech_body_schema_errors_are_fastapi_422s(
    http: httpx.Client, body: dict[str, Any], location: list[str]
) -> None:
    response = http.post(f"/v1/text-to-speech/{VOICE}", json=body, headers=eleven_headers())
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert [problem["loc"] for problem in detail] == [location]
    assert detail[0]["msg"]


def test_speech_body_must_be_json(http: httpx.Client) -> None:
    response = http.post(f"/v1/text-to-speech/{VOICE}", content=b"text=hi", headers=eleven_headers())
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"


def test_5000_characters_are_accepted(http: httpx.Client) -> None:
    response = speak(http, "a" * 5000)
    assert response.status_code == 200
    assert response.headers["character-cost"] == "5000"


def test_pcm_is_raw_16_bit_audio_that_grows_with_the_text(http: httpx.Client) -> None:
    short = speak(http, "Hi", "pcm_16000")
    long = speak(http, "Hi, it is lovely to hear from you again today", "pcm_16000")
    for response in (short, long):
        assert response.status_code == 200
        assert response.headers["content-type"] == "audio/pcm"
        assert len(response.content) % 2 == 0
    assert len(long.content) > 3 * len(short.content)
    seconds = len(long.content) / 2 / 16000
    assert seconds == pytest.approx(audio.tone_seconds("Hi, it is lovely to hear from you again today"), abs=0.01)
    samples = memoryview(long.content).cast("h")
    assert max(abs(sample) for sample in samples) > 5000  # a tone, not silence


def test_pcm_length_follows_the_sample_rate(http: httpx.Client) -> None:
    text = "The quick brown fox"
    lengths = {rate: len(speak(http, text, f"pcm_{rate}").content) for rate in (16000, 24000, 44100)}
    assert lengths[24000] / lengths[16000] == pytest.approx(1.5, rel=0.01)
    assert lengths[44100] / lengths[16000] == pytest.approx(44100 / 16000, rel=0.01)


def test_same_text_same_audio(http: httpx.Client) -> None:
    assert speak(http, "Same words", "pcm_22050").content == speak(http, "Same words", "pcm_22050").content
    assert speak(http, "Same words", "pcm_22050").content != speak(http, "Other words", "pcm_22050").content


@pytest.mark.parametrize(
    ("output_format", "mpeg1", "rate", "kbps"),
    [
        ("mp3_22050_32", False, 22050, 32),
        ("mp3_44100_64", True, 44100, 64),
        ("mp3_44100_128", True, 44100, 128),
        ("mp3_44100_192", True, 44100, 192),
        (None, True, 44100, 128),
    ],
    ids=["22050-32", "44100-64", "44100-128", "44100-192", "default"],
)
def test_mp3_is_a_valid_frame_stream_of_the_speech_duration(
    http: httpx.Client, output_format: str | None, mpeg1: bool, rate: int, kbps: int
) -> None:
    text = "This is what the companion says back to the user."
    response = speak(http, text, output_format)
    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/mpeg"
    frames = parse_mp3_frames(response.content)
    assert {(f.mpeg1, f.rate, f.kbps, f.mono) for f in frames} == {(mpeg1, rate, kbps, True)}
    seconds = sum(f.samples for f in frames) / rate
    assert audio.tone_seconds(text) <= seconds < audio.tone_seconds(text) + frames[0].samples / rate
    # The padding bit keeps the average bit rate exact.
    assert len(response.content) * 8 / seconds == pytest.approx(kbps * 1000, rel=0.01)


def test_mp3_grows_with_the_text(http: httpx.Client) -> None:
    short = parse_mp3_frames(speak(http, "Hi").content)
    long = parse_mp3_frames(speak(http, "Hi there, this is a considerably longer reply to play").content)
    assert len(long) > 3 * len(short)


def test_stream_route_sends_the_same_audio_chunked(http: httpx.Client) -> None:
    whole = speak(http, "Streaming works too")
    streamed = speak(http, "Streaming works too", stream=True)
    assert streamed.status_code == 200
    assert streamed.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in streamed.headers
    assert streamed.content == whole.content


def test_speech_headers(http: httpx.Client) -> None:
    response = speak(http, "Count these characters")
    assert response.headers["character-cost"] == str(len("Count these characters"))
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["request-id"])
    assert response.headers["current-concurrent-requests"] == "1"
    assert response.headers["maximum-concurrent-requests"] == "3"


def test_more_requests_in_flight_than_allowed_get_429(http: httpx.Client, sim_server: ServerThread) -> None:
    assert http.put("/_sim/latency", json={"speech": 600}).status_code == 200
    results: list[httpx.Response] = []

    def one() -> None:
        with client(sim_server) as own:
            results.append(speak(own, "Hello"))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    statuses = sorted(response.status_code for response in results)
    assert statuses == [200, 200, 200, 429]
    refused = next(response for response in results if response.status_code == 429)
    assert refused.json()["detail"]["status"] == "too_many_concurrent_requests"
    assert refused.headers["maximum-concurrent-requests"] == "3"
    assert "retry-after" not in refused.headers  # ElevenLabs documents none
    http.put("/_sim/latency", json={"speech": 0})
    assert speak(http).status_code == 200


# -- espeak-ng and lame ---------------------------------------------------------------------------------


def test_espeak_output_is_parsed_and_resampled(tmp_path: Path) -> None:
    script = fake_espeak(tmp_path)
    with running_sim(speech_engine="espeak-ng", espeak_command=str(script)) as server, client(server) as http:
        text = "-starts like an option"
        native = speak(http, text, "pcm_22050")
        resampled = speak(http, text, "pcm_16000")
        mp3 = speak(http, text, "mp3_44100_64")
        health = http.get("/_sim/health").json()
    assert health["speech_engine"] == "espeak-ng"
    frames = int(0.05 * FAKE_ESPEAK_RATE) * len(text)
    assert len(native.content) == 2 * frames  # the data ran to the end despite the 0x7FFFFFFF size
    assert len(resampled.content) == 2 * (frames * 16000 // FAKE_ESPEAK_RATE)
    mp3_seconds = sum(f.samples for f in parse_mp3_frames(mp3.content)) / 44100
    assert mp3_seconds == pytest.approx(frames / FAKE_ESPEAK_RATE, abs=0.03)
    arguments, stdin = logged_calls(script)[0]
    assert arguments == ["--stdin", "--stdout"]
    assert stdin == text.encode()  # on standard input, so never taken for an option


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_real_espeak_speech() -> None:
    with running_sim(speech_engine="espeak-ng") as server, client(server, timeout=30) as http:
        short = speak(http, "Hello.", "pcm_24000")
        long = speak(http, "Hello. This is a much longer sentence for the speech engine to say.", "pcm_24000")
        mp3 = speak(http, "Hello there.", "mp3_44100_128")
    assert short.status_code == long.status_code == 200
    assert len(long.content) > 2 * len(short.content)
    assert parse_mp3_frames(mp3.content)


def test_lame_encodes_when_chosen(tmp_path: Path) -> None:
    script = fake_lame(tmp_path)
    with running_sim(mp3_encoder="lame", lame_command=str(script)) as server, client(server) as http:
        response = speak(http, "Encode me", "mp3_22050_32")
    assert response.content == FAKE_MP3
    arguments, pcm_bytes = logged_calls(script)[0]
    assert pcm_bytes == len(audio.tone_pcm("Encode me", 22050))
    assert arguments[arguments.index("-s") + 1] == "22.05"
    assert arguments[arguments.index("-b") + 1] == "32"
    assert {"-r", "--signed", "--little-endian", "--cbr"} <= set(arguments)


def test_settings_refuse_a_missing_tool() -> None:
    with pytest.raises(ValueError, match="SIM_ESPEAK_COMMAND"):
        SimSettings(speech_engine="espeak-ng", espeak_command="/nonexistent/espeak-ng")
    with pytest.raises(ValueError, match="SIM_LAME_COMMAND"):
        SimSettings(mp3_encoder="lame", lame_command="/nonexistent/lame")


# -- faults, latency, call counts -------------------------------------------------------------------


def test_fault_answers_n_calls_then_the_provider_answers(http: httpx.Client) -> None:
    add_fault(http, route="chat", status=503, times=2)
    responses = [chat(http, chat_body(("user", "hi"))) for _ in range(3)]
    assert [r.status_code for r in responses] == [503, 503, 200]
    assert responses[0].json()["error"]["code"] == "service_unavailable"
    assert responses[0].headers["x-request-id"].startswith("req_")
    assert calls(http)["chat"] == {"received": 3, "faulted": 2, "statuses": {"200": 1, "503": 2}}
    assert http.get("/_sim/faults").json() == {"faults": []}


def test_faults_queue_per_route_in_order(http: httpx.Client) -> None:
    add_fault(http, route="transcribe", status=500, times=1)
    add_fault(http, route="transcribe", status=502, times=1)
    add_fault(http, route="speech", status=503, times=1)
    statuses = [upload(http, wav_file(0.2)).status_code for _ in range(3)]
    assert statuses == [500, 502, 200]
    assert chat(http, chat_body(("user", "hi"))).status_code == 200  # other routes unaffected
    refused = speak(http)
    assert refused.status_code == 503
    assert refused.json()["detail"]["status"] == "service_unavailable"


def test_429_faults_in_each_providers_words(http: httpx.Client) -> None:
    add_fault(http, route="chat", status=429, times=1)
    add_fault(http, route="speech", status=429, times=1)
    groq = chat(http, chat_body(("user", "hi")))
    assert groq.status_code == 429
    assert groq.headers["retry-after"] == "1"
    assert groq.json()["error"]["code"] == "rate_limit_exceeded"
    eleven = speak(http)
    assert eleven.status_code == 429
    assert eleven.json()["detail"]["status"] == "system_busy"
    assert "retry-after" not in eleven.headers


def test_groq_capacity_fault_498(http: httpx.Client) -> None:
    add_fault(http, route="chat", status=498, times=1)
    response = chat(http, chat_body(("user", "hi")))
    assert response.status_code == 498
    assert response.json()["error"]["code"] == "capacity_exceeded"


def test_fault_without_times_lasts_until_cleared(http: httpx.Client) -> None:
    add_fault(http, route="speech", status=500)
    assert [speak(http).status_code for _ in range(3)] == [500, 500, 500]
    listed = http.get("/_sim/faults").json()["faults"]
    assert [(f["route"], f["status"], f["remaining"]) for f in listed] == [("speech", 500, -1)]
    assert http.delete("/_sim/faults").json() == {"cleared": 1}
    assert speak(http).status_code == 200


def test_delay_with_status_200_answers_late(http: httpx.Client) -> None:
    add_fault(http, route="chat", status=200, times=1, delay_ms=300)
    started = time.monotonic()
    late = chat(http, chat_body(("user", "hi")))
    elapsed = time.monotonic() - started
    assert late.status_code == 200
    assert elapsed >= 0.3
    started = time.monotonic()
    chat(http, chat_body(("user", "hi")))
    assert time.monotonic() - started < 0.3
    assert calls(http)["chat"]["faulted"] == 1


def test_a_client_that_gives_up_during_a_delay_is_counted_as_499(http: httpx.Client, sim_server: ServerThread) -> None:
    add_fault(http, route="transcribe", status=200, times=1, delay_ms=5000)
    with client(sim_server, timeout=0.3) as impatient, pytest.raises(httpx.ReadTimeout):
        upload(impatient, wav_file(0.2))
    assert wait_until(lambda: calls(http)["transcribe"]["statuses"] == {"499": 1}, timeout=3)


def test_a_client_that_leaves_mid_upload_is_counted_as_499(http: httpx.Client, sim_server: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", sim_server.port)) as sock:
        sock.sendall(
            b"POST /openai/v1/audio/transcriptions HTTP/1.1\r\nhost: sim\r\nauthorization: Bearer gsk_test_key\r\n"
            b"content-type: multipart/form-data; boundary=x\r\ncontent-length: 100000\r\n\r\n--x\r\n"
        )
        assert wait_until(lambda: calls(http)["transcribe"]["received"] == 1, timeout=3)
    assert wait_until(lambda: calls(http)["transcribe"]["statuses"] == {"499": 1}, timeout=3)


def test_abort_after_bytes_cuts_the_connection(http: httpx.Client) -> None:
    add_fault(http, route="speech", status=200, times=1, abort_after_bytes=1000)
    with pytest.raises(httpx.RemoteProtocolError):
        speak(http, "This answer will be cut short", stream=True)
    add_fault(http, route="chat", status=200, times=1, abort_after_bytes=10)
    with pytest.raises(httpx.RemoteProtocolError):
        chat(http, chat_body(("user", "hi")))
    assert speak(http).status_code == 200


def test_base_latency_and_route_latency(http: httpx.Client) -> None:
    with running_sim(latency_ms=200) as server, client(server) as slow:
        started = time.monotonic()
        assert chat(slow, chat_body(("user", "hi"))).status_code == 200
        assert time.monotonic() - started >= 0.2
        assert slow.get("/_sim/latency").json() == {
            "base_ms": 200,
            "routes": {"chat": 0, "transcribe": 0, "speech": 0},
        }
    assert http.put("/_sim/latency", json={"transcribe": 250}).json()["routes"]["transcribe"] == 250
    started = time.monotonic()
    assert upload(http, wav_file(0.2)).status_code == 200
    assert time.monotonic() - started >= 0.25


@pytest.mark.parametrize(
    "fault",
    [
        {"route": "email", "status": 503},
        {"route": "chat", "status": 302},
        {"route": "chat", "status": 503, "times": 0},
        {"route": "chat", "status": 503, "delay_ms": -5},
        {"route": "chat", "status": 503, "abort_after_bytes": 10},
        {"route": "chat", "status": 503, "colour": "red"},
        {"status": 503},
    ],
    ids=["route", "status", "times", "delay", "abort-needs-200", "unknown-field", "no-route"],
)
def test_invalid_faults_are_refused(http: httpx.Client, fault: dict[str, Any]) -> None:
    response = http.post("/_sim/faults", json=fault)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"
    assert http.get("/_sim/faults").json() == {"faults": []}


def test_several_faults_in_one_post_and_call_counts_reset(http: httpx.Client) -> None:
    response = http.post(
        "/_sim/faults", json=[{"route": "chat", "status": 500, "times": 1}, {"route": "chat", "status": 504}]
    )
    assert response.status_code == 201
    assert [f["status"] for f in response.json()["faults"]] == [500, 504]
    assert [chat(http, chat_body(("user", "hi"))).status_code for _ in range(2)] == [500, 504]
    assert calls(http)["chat"]["received"] == 2
    http.delete("/_sim/calls")
    assert calls(http)["chat"] == {"received": 0, "faulted": 0, "statuses": {}}
    assert chats(http) == []  # the faulted calls were never answered, so never listed


def test_health_and_unknown_paths(http: httpx.Client) -> None:
    assert http.get("/_sim/health").json() == {"status": "ok", "speech_engine": "tone", "mp3_encoder": "silent"}
    plain = http.get("/nowhere")
    assert plain.status_code == 404
    assert plain.json()["error"]["code"] == "not_found"
    groq = http.post("/openai/v1/embeddings", headers=groq_headers())
    assert groq.status_code == 404
    assert groq.json()["error"]["code"] == "unknown_url"
    assert http.get(CHAT_PATH).status_code == 405
    eleven = http.get("/v1/voices")
    assert eleven.status_code == 404
    assert eleven.json() == {"detail": "Not Found"}


# -- python -m sim ------------------------------------------------------------------------------------


def run_sim_process(env: dict[str, str], timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sim"],
        cwd=PROJECT_ROOT,
        env={**environment_without_sim(), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("port", ["70000", "0", "ninety"])
def test_invalid_port_stops_the_start_up(port: str) -> None:
    result = run_sim_process({"SIM_PORT": port})
    assert result.returncode == 2
    assert "SIM_PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_settings_are_all_named() -> None:
    result = run_sim_process({"SIM_LATENCY_MS": "-1", "SIM_ELEVENLABS_MAX_CONCURRENT": "0"})
    assert result.returncode == 2
    assert "SIM_LATENCY_MS" in result.stderr
    assert "SIM_ELEVENLABS_MAX_CONCURRENT" in result.stderr


def test_python_m_sim_serves_and_logs_json_lines(tmp_path: Path) -> None:
    port = closed_port()
    env = {**environment_without_sim(), "SIM_PORT": str(port), "SIM_GROQ_API_KEY": "k", "PYTHONUNBUFFERED": "1"}
    stdout_path = tmp_path / "sim.stdout"
    with stdout_path.open("w") as stdout:
        process = subprocess.Popen(
            [sys.executable, "-m", "sim"], cwd=PROJECT_ROOT, env=env, stdout=stdout, stderr=subprocess.PIPE
        )
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(url + "/_sim/health", trust_env=False).status_code == 200
            except httpx.TransportError:
                return False

        assert wait_until(healthy, timeout=15), stdout_path.read_text()
        reply = httpx.post(url + CHAT_PATH, json=chat_body(("user", "hi")), headers=groq_headers("k"), trust_env=False)
        assert reply.status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = [json.loads(line) for line in stdout_path.read_text().splitlines()]
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    ready = next(line for line in lines if line["message"] == "provider simulator ready")
    assert ready["groq_key_required"] is True
    assert ready["elevenlabs_key_required"] is False
    access = [line for line in lines if line["logger"] == "sim.access"]
    assert [(line["path"], line["status"]) for line in access] == [(CHAT_PATH, 200)]


def test_speech_key_is_checked_against_the_setting(http: httpx.Client) -> None:
    assert speak(http, headers=eleven_headers(ELEVEN_KEY)).status_code == 200
