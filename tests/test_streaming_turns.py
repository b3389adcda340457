"""The streaming turn (docs/app.md#the-streaming-turn), end to end through the edge against
the simulators: `Accept: text/event-stream` gets `transcript`, `reply` deltas, `audio`
chunks and `done` (or `error`) as they happen; the stored audio is the streamed chunks;
degradation, refusals, the timeout and a client that hangs up keep today's guarantees."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.app_support import (
    API,
    ApiClient,
    AppThread,
    Simulators,
    app_settings,
    start_app,
    start_app_edge,
)
from tests.servers import RunningEdge, closed_port
from tests.sim_support import parse_mp3_frames, start_sim, wav_file

FACT = "I love hiking and my sister lives in Paris"  # answered in two sentences
EVENT_STREAM = {"accept": "text/event-stream"}

pytestmark = pytest.mark.usefixtures("fresh_sims")


@dataclass
class Event:
    name: str
    data: Any
    at: float  # seconds since the request was sent


def stream_turn(url: str, session_id: str, *, timeout: float = 30, **body: Any) -> tuple[httpx.Response, list[Event]]:
    """Posts a turn asking for events; every event with the time it arrived."""
    started = time.monotonic()
    events: list[Event] = []
    with (
        httpx.Client(base_url=url, trust_env=False, timeout=timeout) as client,
        client.stream("POST", f"{API}/sessions/{session_id}/turns", headers=EVENT_STREAM, **body) as response,
    ):
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            response.read()
            return response, events
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                assert name is not None, line
                events.append(Event(name, json.loads(line.removeprefix("data: ")), time.monotonic() - started))
                name = None
    return response, events


def named(events: list[Event], name: str) -> list[Event]:
    return [event for event in events if event.name == name]


def audio_of(events: list[Event]) -> list[bytes]:
    chunks = named(events, "audio")
    assert [chunk.data["seq"] for chunk in chunks] == list(range(len(chunks)))
    return [base64.b64decode(chunk.data["data"]) for chunk in chunks]


@pytest.fixture(scope="module")
def app(sims: Simulators, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppThread]:
    started = start_app(app_settings(sims, tmp_path_factory.mktemp("streaming")))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def edge(app: AppThread) -> Iterator[RunningEdge]:
    running = start_app_edge(app.url)
    yield running
    running.server.stop()


@pytest.fixture
def api(edge: RunningEdge) -> Iterator[ApiClient]:
    with ApiClient(edge.url) as client:
        yield client


def test_a_streamed_text_turn_tells_its_words_reply_and_speech_in_order(api: ApiClient, edge: RunningEdge) -> None:
    session_id = api.create_session()
    response, events = stream_turn(edge.url, session_id, json={"text": FACT})
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-request-id"]  # the edge's concerns applied
    names = [event.name for event in events]
    assert names[0] == "transcript"
    assert names[-1] == "done"
    assert set(names[1:-1]) == {"reply", "audio"}
    assert events[0].data == {"text": FACT}
    done = events[-1].data
    assert "".join(event.data["delta"] for event in named(events, "reply")) == done["reply"]
    assert done["reply"].startswith("You love hiking and your sister lives in Paris.")
    assert done["transcript"] == FACT
    assert done["degraded"] == []
    assert set(done) == {"turn_id", "transcript", "reply", "audio_url", "degraded", "timings_ms"}

    chunks = audio_of(events)
    assert len(chunks) == 2  # a sentence each
    for chunk in chunks:
        assert parse_mp3_frames(chunk)  # each playable on its own
    assert {event.data["content_type"] for event in named(events, "audio")} == {"audio/mpeg"}
    stored = api.get(done["audio_url"])
    assert stored.status_code == 200
    assert stored.content == b"".join(chunks)

    messages = api.session(session_id)["messages"]
    assert [(message["role"], message["text"]) for message in messages] == [
        ("user", FACT),
        ("assistant", done["reply"]),
    ]
    assert messages[1]["audio_url"] == done["audio_url"]


def test_a_streamed_voice_turn_tells_the_transcript_first(api: ApiClient, edge: RunningEdge) -> None:
    session_id = api.create_session()
    files = {"audio": ("speech.wav", wav_file(1.0), "audio/wav")}
    response, events = stream_turn(edge.url, session_id, files=files)
    assert response.status_code == 200
    assert events[0].name == "transcript"
    assert events[0].data["text"]
    assert events[-1].name == "done"
    assert events[-1].data["transcript"] == events[0].data["text"]


def test_without_the_accept_header_the_turn_is_json_as_before(api: ApiClient) -> None:
    session_id = api.create_session()
    response = api.text_turn(session_id, FACT)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert "server-timing" in response.headers


def test_refusals_before_the_turn_keep_their_status(api: ApiClient, edge: RunningEdge) -> None:
    response, events = stream_turn(edge.url, "x" * 32, json={"text": FACT})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert events == []
    response, _ = stream_turn(edge.url, api.create_session(), json={"text": "   "})
    assert response.status_code == 422
    assert response.json()["error"]["code"]


def test_speech_down_streams_text_only_and_says_so(api: ApiClient, edge: RunningEdge, sims: Simulators) -> None:
    sims.fault("speech", 503)
    session_id = api.create_session()
    _, events = stream_turn(edge.url, session_id, json={"text": FACT})
    assert named(events, "audio") == []
    done = events[-1]
    assert done.name == "done"
    assert done.data["degraded"] == ["speech"]
    assert done.data["audio_url"] is None
    assert api.session(session_id)["messages"][1]["audio_url"] is None


def test_the_model_down_is_an_error_event_and_the_words_are_kept(
    api: ApiClient, edge: RunningEdge, sims: Simulators
) -> None:
    sims.fault("chat", 503)
    session_id = api.create_session()
    response, events = stream_turn(edge.url, session_id, json={"text": FACT})
    assert response.status_code == 200
    assert [event.name for event in events] == ["transcript", "error"]
    error = events[-1].data["error"]
    assert error["code"] == "reply_unavailable"
    assert error["request_id"] == response.headers["x-request-id"]
    assert [message["text"] for message in api.session(session_id)["messages"]] == [FACT]


def test_the_next_streamed_turn_sees_the_memory_the_last_one_made(
    api: ApiClient, edge: RunningEdge, sims: Simulators
) -> None:
    session_id = api.create_session()
    stream_turn(edge.url, session_id, json={"text": FACT})
    _, events = stream_turn(edge.url, session_id, json={"text": "Do you remember where my sister lives?"})
    assert sims.context(events[-1].data["transcript"]) == (2, 1)
    assert "Paris" in events[-1].data["reply"]


def test_a_client_that_hangs_up_mid_stream_leaves_a_whole_turn(app: AppThread, edge: RunningEdge) -> None:
    """The turn completes server-side: words, reply and speech saved, the session usable."""
    with ApiClient(edge.url) as api:
        session_id = api.create_session()
        with (
            httpx.Client(base_url=edge.url, trust_env=False, timeout=30) as client,
            client.stream(
                "POST", f"{API}/sessions/{session_id}/turns", headers=EVENT_STREAM, json={"text": FACT}
            ) as response,
        ):
            first = next(response.iter_lines())
            assert first == "event: transcript"
        app.run(app.companion.settled())
        messages = api.session(session_id)["messages"]
        assert [message["role"] for message in messages] == ["user", "assistant"]
        assert messages[1]["audio_url"] is not None
        assert api.get(messages[1]["audio_url"]).status_code == 200
        assert api.say(session_id, "Are you there?")["reply"]


@pytest.fixture(scope="module")
def paced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Simulators, RunningEdge]]:
    """Simulators with a slow model and fast speech (the realistic profile with small
    figures), an app and an edge in front of them."""
    realistic = {
        "profile": "realistic",
        "realistic_ttft_ms": 50,
        "realistic_tokens_per_second": 40,
        "realistic_ttfb_ms": 20,
        "realistic_synthesis_speed": 200,
    }
    sims = Simulators(groq=start_sim(**realistic), elevenlabs=start_sim(**realistic))
    app = start_app(app_settings(sims, tmp_path_factory.mktemp("paced"), feature_memory=False))
    edge = start_app_edge(app.url)
    yield sims, edge
    edge.server.stop()
    app.stop()
    sims.groq.stop()
    sims.elevenlabs.stop()


def test_the_first_sentence_is_heard_while_the_model_still_writes(paced: tuple[Simulators, RunningEdge]) -> None:
    _, edge = paced
    with ApiClient(edge.url) as api:
        session_id = api.create_session()
    _, events = stream_turn(edge.url, session_id, json={"text": FACT})
    first_audio = named(events, "audio")[0].at
    deltas = named(events, "reply")
    assert deltas[0].at < first_audio < deltas[-1].at, [(event.name, round(event.at, 3)) for event in events]
    assert events[-1].name == "done"


def test_a_turn_past_its_time_is_an_error_event_and_the_session_stays_as_it_was(
    sims: Simulators, tmp_path: Path
) -> None:
    app = start_app(app_settings(sims, tmp_path / "data", turn_timeout_s=1.0, memory_duplicate_similarity=0.97))
    edge = start_app_edge(app.url)
    try:
        with ApiClient(edge.url) as api:
            session_id = api.create_session()
            sims.fault("chat", 200, times=1, delay_ms=3000)
            _, events = stream_turn(edge.url, session_id, json={"text": FACT})
            assert events[-1].name == "error"
            assert events[-1].data["error"]["code"] == "turn_timeout"
            assert api.session(session_id)["messages"] == []
    finally:
        edge.server.stop()
        app.stop()


def test_memory_down_streams_the_turn_degraded(sims: Simulators, tmp_path: Path) -> None:
    app = start_app(app_settings(sims, tmp_path / "data", qdrant_url=f"http://127.0.0.1:{closed_port()}"))
    edge = start_app_edge(app.url)
    try:
        with ApiClient(edge.url) as api:
            session_id = api.create_session()
        _, events = stream_turn(edge.url, session_id, json={"text": FACT})
        assert events[-1].name == "done"
        assert events[-1].data["degraded"] == ["memory"]
        assert named(events, "audio")
    finally:
        edge.server.stop()
        app.stop()
