"""The simulator's streams over real sockets: Groq's chat completions as server-sent events
(the same content as the whole reply, in token-sized pieces), ElevenLabs' `/stream` in whole
MP3 frames, and the latency profiles: `realistic` spreads the pieces in time as the
providers' figures say, `instant` adds nothing.

The streams are read off the wire with a small chunked-transfer reader, so each HTTP chunk
the simulator sent is seen as sent, with the moment it arrived.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from common.settings import ConfigurationError, load
from sim import groq
from sim.elevenlabs import MODELS as SPEECH_MODELS
from sim.latency import CHAT_FIGURES, SPEECH_FIGURES, TRANSCRIPTION_SPEED_FACTORS
from sim.settings import SimSettings
from tests.servers import ServerThread, wait_until
from tests.sim_support import (
    CHAT_PATH,
    VOICE,
    chat_body,
    client,
    eleven_headers,
    groq_headers,
    parse_mp3_frames,
    running_sim,
    upload,
    wav_file,
)

SPEECH_PATH = f"/v1/text-to-speech/{VOICE}"
STATEMENT = "I love hiking in the mountains with my dog and my sister lives in Paris"
# About three seconds of tone: a stream of a dozen MP3 chunks at mp3_44100_128.
SPOKEN = "This sentence is long enough to be streamed in several pieces of whole frames"
SLACK_SECONDS = 1.5  # upper bound on the scheduling noise of a loaded two-core machine


# -- a chunked-transfer reader that notes when each chunk came ----------------------------------------


@dataclass
class Streamed:
    status: int
    headers: dict[str, str]
    started: float  # when the request was sent
    chunks: list[tuple[float, bytes]] = field(default_factory=list)  # seconds after `started`
    complete: bool = False  # the terminating zero-size chunk came

    @property
    def body(self) -> bytes:
        return b"".join(data for _, data in self.chunks)


def stream_request(port: int, path: str, headers: dict[str, str], body: Any, timeout: float = 20.0) -> Streamed:
    """POSTs `body` as JSON and reads the chunked answer chunk by chunk, until its end or
    until the server drops the connection."""
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    head += f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        buffer = bytearray()

        def fill() -> bool:
            data = sock.recv(65536)
            buffer.extend(data)
            return bool(data)

        def line() -> bytes | None:
            while b"\r\n" not in buffer:
                if not fill():
                    return None
            end = buffer.index(b"\r\n")
            found = bytes(buffer[:end])
            del buffer[: end + 2]
            return found

        started = time.monotonic()
        sock.sendall(head.encode() + payload)
        while b"\r\n\r\n" not in buffer:
            assert fill(), f"closed before the response head: {bytes(buffer)!r}"
        head_bytes, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        buffer[:] = rest
        status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
        fields = dict(line_.split(": ", 1) for line_ in header_lines)
        streamed = Streamed(int(status_line.split()[1]), {k.lower(): v for k, v in fields.items()}, started)
        if streamed.headers.get("transfer-encoding") != "chunked":
            size = int(streamed.headers.get("content-length", "0"))
            while len(buffer) < size and fill():
                pass
            streamed.chunks.append((time.monotonic() - started, bytes(buffer[:size])))
            streamed.complete = len(buffer) >= size
            return streamed
        while (size_line := line()) is not None:
            size = int(size_line.split(b";")[0], 16)
            while len(buffer) < size + 2 and fill():
                pass
            arrived = time.monotonic() - started
            if len(buffer) < size + 2:  # cut mid-chunk
                if buffer:
                    streamed.chunks.append((arrived, bytes(buffer)))
                return streamed
            if size == 0:
                streamed.complete = True
                return streamed
            streamed.chunks.append((arrived, bytes(buffer[:size])))
            del buffer[: size + 2]
        return streamed


def sse_events(body: bytes) -> list[str]:
    """The `data:` payloads of a server-sent event stream, checking its framing."""
    assert body.endswith(b"\n\n"), body[-80:]
    events = body.decode().split("\n\n")[:-1]
    assert all(event.startswith("data: ") and "\n" not in event for event in events), events
    return [event.removeprefix("data: ") for event in events]


def chat_stream(port: int, body: dict[str, Any]) -> Streamed:
    return stream_request(port, CHAT_PATH, groq_headers(), {**body, "stream": True})


def speech_body(text: str = SPOKEN, model_id: str = "eleven_flash_v2_5") -> dict[str, Any]:
    return {"text": text, "model_id": model_id}


@pytest.fixture(scope="module")
def realistic() -> Iterator[ServerThread]:
    """Small figures, so the spread is measurable and the tests stay short."""
    with running_sim(
        profile="realistic",
        realistic_ttft_ms=200,
        realistic_tokens_per_second=50,
        realistic_ttfb_ms=200,
        realistic_synthesis_speed=10,
        realistic_transcription_overhead_ms=100,
        realistic_transcription_speed_factor=10,
    ) as server:
        yield server


def reset(server: ServerThread) -> None:
    with client(server) as control:
        control.post("/_sim/reset").raise_for_status()


# -- Groq: server-sent events ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        chat_body(("user", STATEMENT)),
        chat_body(("system", "Summarise the conversation."), ("user", STATEMENT), ("assistant", "Noted.")),
        chat_body(("user", STATEMENT), max_tokens=5),
        chat_body(
            ("system", "Extract a fact worth keeping in memory."),
            ("user", STATEMENT),
            response_format={"type": "json_object"},
            model="llama-3.1-8b-instant",
        ),
    ],
    ids=["reply", "summary", "max-tokens", "json-mode"],
)
def test_a_stream_is_groqs_events_with_the_whole_replys_content(
    http: httpx.Client, sim_server: ServerThread, body: dict[str, Any]
) -> None:
    whole = http.post(CHAT_PATH, json=body, headers=groq_headers())
    assert whole.status_code == 200, whole.text
    completion = whole.json()

    streamed = chat_stream(sim_server.port, body)
    assert streamed.status == 200
    assert streamed.complete
    assert streamed.headers["content-type"] == "text/event-stream"
    assert "content-length" not in streamed.headers
    assert streamed.headers["x-request-id"].startswith("req_")
    assert streamed.headers["x-ratelimit-remaining-requests"].isdigit()
    events = sse_events(streamed.body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert {chunk["model"] for chunk in chunks} == {body["model"]}

    first, *middle, last = (chunk["choices"][0] for chunk in chunks)
    assert first["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0]["x_groq"]["id"] == streamed.headers["x-request-id"]
    pieces = [choice["delta"]["content"] for choice in middle]
    assert all(choice["finish_reason"] is None and set(choice["delta"]) == {"content"} for choice in middle)
    assert all(1 <= len(piece) <= groq.CHARACTERS_PER_TOKEN for piece in pieces)
    assert "".join(pieces) == completion["choices"][0]["message"]["content"]
    assert len(pieces) == completion["usage"]["completion_tokens"]

    assert last["delta"] == {}
    assert last["finish_reason"] == completion["choices"][0]["finish_reason"]
    usage = chunks[-1]["x_groq"]["usage"]
    assert {name: usage[name] for name in completion["usage"]} == completion["usage"]
    assert {"queue_time", "prompt_time", "completion_time", "total_time"} <= usage.keys()


def test_a_stream_is_counted_and_listed_like_a_whole_reply(http: httpx.Client, sim_server: ServerThread) -> None:
    assert chat_stream(sim_server.port, chat_body(("user", "Hello"))).complete
    assert http.get("/_sim/calls").json()["chat"]["statuses"] == {"200": 1}
    assert http.get("/_sim/chats").json()["chats"] == [{"kind": "reply", "said": "Hello", "messages": 0, "memories": 0}]


def test_an_error_fault_answers_before_the_stream_starts(http: httpx.Client, sim_server: ServerThread) -> None:
    assert http.post("/_sim/faults", json={"route": "chat", "status": 503, "times": 1}).status_code == 201
    refused = chat_stream(sim_server.port, chat_body(("user", STATEMENT)))
    assert refused.status == 503
    assert refused.headers["content-type"] == "application/json"
    assert json.loads(refused.body)["error"]["code"] == "service_unavailable"
    assert chat_stream(sim_server.port, chat_body(("user", STATEMENT))).status == 200


def test_json_mode_that_cannot_fit_max_tokens_fails_before_the_stream(sim_server: ServerThread) -> None:
    body = chat_body(("user", STATEMENT), response_format={"type": "json_object"}, max_tokens=2)
    refused = chat_stream(sim_server.port, body)
    assert refused.status == 400
    assert json.loads(refused.body)["error"]["code"] == "json_validate_failed"


def test_a_cut_short_stream_stops_mid_way_without_done(http: httpx.Client, sim_server: ServerThread) -> None:
    fault = {"route": "chat", "status": 200, "times": 1, "abort_after_bytes": 700}
    assert http.post("/_sim/faults", json=fault).status_code == 201
    cut = chat_stream(sim_server.port, chat_body(("user", STATEMENT)))
    assert cut.status == 200
    assert not cut.complete
    assert len(cut.body) == 700
    assert cut.body.startswith(b"data: {")
    assert b"[DONE]" not in cut.body
    whole = chat_stream(sim_server.port, chat_body(("user", STATEMENT)))
    assert whole.complete
    assert len(whole.body) > 700  # the cut was mid-way


def test_streamed_tokens_come_at_the_profiles_pace(realistic: ServerThread) -> None:
    reset(realistic)
    streamed = chat_stream(realistic.port, chat_body(("user", STATEMENT)))
    assert streamed.complete
    events = sse_events(streamed.body)
    tokens = len(events) - 3  # less the role, the finish and [DONE]
    assert tokens > 15
    total = 0.2 + tokens / 50
    first_at, last_at = streamed.chunks[0][0], streamed.chunks[-1][0]
    assert first_at >= 0.2, streamed.chunks[:2]
    assert last_at >= total
    assert last_at < total + SLACK_SECONDS
    # One HTTP chunk per event, each token no earlier than its time (20 ms after the last),
    # and spread out, not sent in one go at the end: the middle one well before the last.
    assert len(streamed.chunks) == tokens + 2
    arrivals = [at for at, _ in streamed.chunks[1:-1]]
    assert all(at >= 0.2 + index / 50 - 0.005 for index, at in enumerate(arrivals)), arrivals
    assert last_at - arrivals[tokens // 2] >= 0.25 * tokens / 50, arrivals


def test_a_whole_reply_under_the_realistic_profile_takes_the_streams_time(realistic: ServerThread) -> None:
    reset(realistic)
    with client(realistic) as http:
        started = time.monotonic()
        whole = http.post(CHAT_PATH, json=chat_body(("user", STATEMENT)), headers=groq_headers())
        elapsed = time.monotonic() - started
    assert whole.status_code == 200
    total = 0.2 + whole.json()["usage"]["completion_tokens"] / 50
    assert total <= elapsed < total + SLACK_SECONDS


def test_a_client_that_gives_up_on_a_slow_model_is_counted_as_499() -> None:
    with running_sim(profile="realistic", realistic_ttft_ms=5000) as server, client(server) as control:
        with client(server, timeout=0.3) as impatient, pytest.raises(httpx.ReadTimeout):
            impatient.post(CHAT_PATH, json=chat_body(("user", "hi")), headers=groq_headers())
        assert wait_until(lambda: control.get("/_sim/calls").json()["chat"]["statuses"] == {"499": 1}, timeout=3)


def test_a_cut_short_stream_under_the_realistic_profile_stops_after_its_first_tokens(
    realistic: ServerThread,
) -> None:
    reset(realistic)
    with client(realistic) as control:
        fault = {"route": "chat", "status": 200, "times": 1, "abort_after_bytes": 1000}
        assert control.post("/_sim/faults", json=fault).status_code == 201
    cut = chat_stream(realistic.port, chat_body(("user", STATEMENT)))
    assert not cut.complete
    assert len(cut.body) == 1000
    assert b"[DONE]" not in cut.body
    assert cut.chunks[0][0] >= 0.2
    assert len(cut.chunks) > 1  # it ran for a while before it died


# -- Groq: transcription --------------------------------------------------------------------------


def test_a_transcription_takes_the_overhead_and_the_audio_over_the_speed_factor(realistic: ServerThread) -> None:
    reset(realistic)
    with client(realistic) as http:
        started = time.monotonic()
        response = upload(http, wav_file(3.0))
        elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    total = 0.1 + 3.0 / 10
    assert total <= elapsed < total + SLACK_SECONDS


# -- ElevenLabs: /stream --------------------------------------------------------------------------


@pytest.mark.parametrize("output_format", ["mp3_44100_128", "mp3_22050_32", "mp3_24000_48"])
def test_speech_stream_chunks_are_whole_frames_that_make_the_whole_mp3(
    http: httpx.Client, sim_server: ServerThread, output_format: str
) -> None:
    query = f"?output_format={output_format}"
    whole = http.post(SPEECH_PATH + query, json=speech_body(), headers=eleven_headers())
    assert whole.status_code == 200
    streamed = stream_request(sim_server.port, f"{SPEECH_PATH}/stream{query}", eleven_headers(), speech_body())
    assert streamed.status == 200
    assert streamed.complete
    assert streamed.headers["content-type"] == "audio/mpeg"
    assert len(streamed.chunks) > 1
    assert streamed.body == whole.content
    for _, chunk in streamed.chunks:
        assert parse_mp3_frames(chunk)  # raises unless the chunk is whole frames


def test_pcm_stream_chunks_are_whole_samples(http: httpx.Client, sim_server: ServerThread) -> None:
    whole = http.post(f"{SPEECH_PATH}?output_format=pcm_16000", json=speech_body(), headers=eleven_headers())
    streamed = stream_request(
        sim_server.port, f"{SPEECH_PATH}/stream?output_format=pcm_16000", eleven_headers(), speech_body()
    )
    assert streamed.complete
    assert streamed.headers["content-type"] == "audio/pcm"
    assert streamed.body == whole.content
    assert all(len(chunk) % 2 == 0 for _, chunk in streamed.chunks)


def test_speech_streams_as_it_is_synthesised(realistic: ServerThread) -> None:
    reset(realistic)
    streamed = stream_request(realistic.port, f"{SPEECH_PATH}/stream", eleven_headers(), speech_body())
    assert streamed.complete
    frames = parse_mp3_frames(streamed.body)
    audio_seconds = sum(frame.samples for frame in frames) / frames[0].rate
    first_seconds = audio_seconds * len(streamed.chunks[0][1]) / len(streamed.body)
    first_at, last_at = streamed.chunks[0][0], streamed.chunks[-1][0]
    assert first_at >= 0.2
    ends = 0.2 + (audio_seconds - first_seconds) / 10
    assert ends - 0.05 <= last_at < ends + SLACK_SECONDS
    # Each chunk no earlier than the audio up to its end is synthesised.
    seconds_per_byte = audio_seconds / len(streamed.body)
    ready = 0
    for at, chunk in streamed.chunks:
        ready += len(chunk)
        assert at >= 0.2 + (ready - len(streamed.chunks[0][1])) * seconds_per_byte / 10 - 0.005


def test_whole_speech_under_the_realistic_profile_takes_the_ttfb_and_the_synthesis(realistic: ServerThread) -> None:
    reset(realistic)
    with client(realistic) as http:
        started = time.monotonic()
        whole = http.post(SPEECH_PATH, json=speech_body(), headers=eleven_headers())
        elapsed = time.monotonic() - started
    frames = parse_mp3_frames(whole.content)
    total = 0.2 + sum(frame.samples for frame in frames) / frames[0].rate / 10
    assert total - 0.05 <= elapsed < total + SLACK_SECONDS


def test_a_cut_short_speech_stream_drops_mid_way(http: httpx.Client, sim_server: ServerThread) -> None:
    fault = {"route": "speech", "status": 200, "times": 1, "abort_after_bytes": 5000}
    assert http.post("/_sim/faults", json=fault).status_code == 201
    cut = stream_request(sim_server.port, f"{SPEECH_PATH}/stream", eleven_headers(), speech_body())
    assert cut.status == 200
    assert not cut.complete
    assert len(cut.body) == 5000


def test_a_speech_stream_holds_its_concurrency_slot_until_it_ends() -> None:
    settings: dict[str, Any] = {
        "profile": "realistic",
        "realistic_ttfb_ms": 0,
        "realistic_synthesis_speed": 4,  # about three seconds of audio: most of a second
        "elevenlabs_max_concurrent": 1,
    }
    with running_sim(**settings) as server, client(server) as http:
        streaming = threading.Thread(
            target=stream_request, args=(server.port, f"{SPEECH_PATH}/stream", eleven_headers(), speech_body())
        )
        streaming.start()
        try:
            assert wait_until(lambda: http.get("/_sim/calls").json()["speech"]["statuses"] == {"200": 1}, timeout=3)
            busy = http.post(SPEECH_PATH, json=speech_body("hi"), headers=eleven_headers())
            assert busy.status_code == 429, busy.text
            assert busy.json()["detail"]["status"] == "too_many_concurrent_requests"
        finally:
            streaming.join(timeout=10)
        assert http.post(SPEECH_PATH, json=speech_body("hi"), headers=eleven_headers()).status_code == 200


# -- the instant profile, and the figures' settings -----------------------------------------------------


def test_the_instant_profile_adds_no_delay_whatever_the_realistic_figures() -> None:
    slow = {"realistic_ttft_ms": 5000, "realistic_tokens_per_second": 1, "realistic_ttfb_ms": 5000}
    with running_sim(**slow) as server, client(server) as http:
        started = time.monotonic()
        streamed = chat_stream(server.port, chat_body(("user", STATEMENT)))
        whole = http.post(CHAT_PATH, json=chat_body(("user", STATEMENT)), headers=groq_headers())
        speech = stream_request(server.port, f"{SPEECH_PATH}/stream", eleven_headers(), speech_body())
        elapsed = time.monotonic() - started
    assert streamed.complete
    assert speech.complete
    assert whole.status_code == 200
    assert elapsed < 1.0


def test_every_model_has_its_figures() -> None:
    assert set(CHAT_FIGURES) == groq.CHAT_MODELS
    assert set(TRANSCRIPTION_SPEED_FACTORS) == groq.TRANSCRIPTION_MODELS
    assert set(SPEECH_FIGURES) == SPEECH_MODELS


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SIM_PROFILE", "fast"),
        ("SIM_REALISTIC_TTFT_MS", "-1"),
        ("SIM_REALISTIC_TOKENS_PER_SECOND", "0"),
        ("SIM_REALISTIC_TRANSCRIPTION_OVERHEAD_MS", "soon"),
        ("SIM_REALISTIC_TRANSCRIPTION_SPEED_FACTOR", "-3"),
        ("SIM_REALISTIC_TTFB_MS", "700000"),
        ("SIM_REALISTIC_SYNTHESIS_SPEED", "nan"),
    ],
)
def test_an_invalid_figure_is_refused_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as refused:
        load(SimSettings)
    assert f"{variable}: " in str(refused.value)
    assert f"(got {value!r})" in str(refused.value)


def test_the_figures_load_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_PROFILE", "realistic")
    monkeypatch.setenv("SIM_REALISTIC_TOKENS_PER_SECOND", "12.5")
    settings = load(SimSettings)
    assert settings.profile == "realistic"
    assert settings.realistic_tokens_per_second == 12.5
    assert settings.realistic_ttft_ms is None  # unset: each model's own


def test_keys_are_still_checked_first_on_streams(sim_server: ServerThread) -> None:
    refused = stream_request(sim_server.port, CHAT_PATH, {"authorization": "Bearer wrong"}, chat_body(("user", "hi")))
    assert refused.status == 401
    speech = stream_request(sim_server.port, f"{SPEECH_PATH}/stream", {"xi-api-key": "wrong"}, speech_body())
    assert speech.status == 401
