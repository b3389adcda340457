"""The internal app end to end: a client -> the edge -> the app -> the provider simulators,
every hop a real HTTP exchange on loopback.

Two simulators stand in for Groq and ElevenLabs; their fault API makes a provider fail,
and their call counts show what reached them. The app runs in a thread (`create_app` under
uvicorn, its lifespan as in production) where a test needs to look inside it, and as
`python -m app` where the process itself matters: a restart on the same data, two
replicas sharing PostgreSQL, a start-up that cannot reach its database. The simulator
records how many messages and memories the model was given for each reply (`GET
/_sim/chats`), which is how these tests see context continuity and memory isolation from
the outside.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

from tests.app_support import (
    API,
    POSTGRES_URL,
    ApiClient,
    AppThread,
    MessageBody,
    Simulators,
    app_environment,
    app_process,
    app_settings,
    error_of,
    new_port,
    postgres_schema,
    running_app,
    schema_url,
    start_app,
    start_app_edge,
    start_app_process,
)
from tests.servers import RunningEdge, closed_port, wait_until
from tests.sim_support import parse_mp3_frames, wav_file

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{32}$")
AUDIO_URL = re.compile(r"^/api/v1/audio/([0-9a-f]{32})$")

# The strict app's limits: small, so that refusals are cheap to provoke.
STRICT_MAX_AUDIO_SECONDS = 2.0
STRICT_MAX_AUDIO_BYTES = 100_000
STRICT_MAX_TEXT_CHARS = 50
STRICT_TURN_TIMEOUT_S = 1.0


def texts(messages: list[MessageBody]) -> list[tuple[str, str]]:
    return [(message["role"], message["text"]) for message in messages]


# -- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fresh_sims(sims: Simulators) -> Iterator[None]:
    """Every test starts with healthy simulators and counts at zero, and leaves no fault behind."""
    sims.reset()
    yield
    sims.clear_faults()


@pytest.fixture(scope="module")
def main_app(sims: Simulators, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppThread]:
    """The app with its defaults (SQLite and embedded Qdrant under its data dir), its documentation off."""
    started = start_app(app_settings(sims, tmp_path_factory.mktemp("main-app"), feature_api_docs=False))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def main_edge(main_app: AppThread) -> Iterator[RunningEdge]:
    edge = start_app_edge(main_app.url)
    yield edge
    edge.server.stop()


@pytest.fixture
def api(main_edge: RunningEdge) -> Iterator[ApiClient]:
    with ApiClient(main_edge.url) as client:
        yield client


@pytest.fixture(scope="module")
def strict_app(sims: Simulators, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppThread]:
    """An app with small limits, a 1 s turn budget, and its OpenAPI document served."""
    settings = app_settings(
        sims,
        tmp_path_factory.mktemp("strict-app"),
        max_audio_seconds=STRICT_MAX_AUDIO_SECONDS,
        max_audio_bytes=STRICT_MAX_AUDIO_BYTES,
        max_text_chars=STRICT_MAX_TEXT_CHARS,
        turn_timeout_s=STRICT_TURN_TIMEOUT_S,
        feature_api_docs=True,
    )
    started = start_app(settings)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def strict_edge(strict_app: AppThread) -> Iterator[RunningEdge]:
    edge = start_app_edge(strict_app.url)
    yield edge
    edge.server.stop()


@pytest.fixture
def strict_api(strict_edge: RunningEdge) -> Iterator[ApiClient]:
    with ApiClient(strict_edge.url) as client:
        yield client


# -- 1. sessions ---------------------------------------------------------------------------------------------


def test_a_session_is_created_with_an_unguessable_id_and_read_back(api: ApiClient) -> None:
    first, second = api.post_session(), api.post_session()
    assert first.status_code == 201, first.text
    assert second.status_code == 201, second.text
    created = first.json()
    assert set(created) == {"session_id", "created_at"}
    assert SESSION_ID.fullmatch(created["session_id"]), created
    assert SESSION_ID.fullmatch(second.json()["session_id"])
    assert created["session_id"] != second.json()["session_id"]

    session = api.session(created["session_id"])
    assert session["session_id"] == created["session_id"]
    assert session["created_at"] == created["created_at"]
    assert session["messages"] == []


@pytest.mark.parametrize(
    "session_id",
    [
        "A" * 32,  # well-formed, unknown
        "k3Jq9v1xQeT0a8ZbW2nLr5sYpD4uGh7c",  # the documentation's example
        "short",
        "A" * 33,
        "%2E%2E%2Fconversations.db",
        "not%20a%20session%20id%20at%20all!",
    ],
)
def test_an_unknown_or_malformed_session_is_404_in_the_envelope(api: ApiClient, session_id: str) -> None:
    for response in (
        api.get_session(session_id),
        api.delete_session(session_id),
        api.text_turn(session_id, "hello"),
    ):
        assert response.status_code == 404, response.text
        assert error_of(response)["code"] == "not_found"


def test_the_envelope_carries_the_request_id_the_client_sent(api: ApiClient) -> None:
    response = api.http.get(f"{API}/sessions/{'B' * 32}", headers={"x-request-id": "e2e-request-42"})
    assert response.status_code == 404
    assert response.headers["x-request-id"] == "e2e-request-42"
    assert error_of(response)["request_id"] == "e2e-request-42"


@pytest.mark.parametrize("path", [f"{API}/nothing-here", f"{API}/sessions/{'A' * 32}/nope", f"{API}/audio/"])
def test_an_unknown_api_path_is_404_in_the_envelope(api: ApiClient, path: str) -> None:
    response = api.get(path)
    assert response.status_code == 404, response.text
    assert error_of(response)["code"] == "not_found"


def allowed(response: httpx.Response) -> set[str]:
    return {method.strip().upper() for method in response.headers.get("allow", "").split(",") if method.strip()}


def test_a_wrong_method_is_405_in_the_envelope(api: ApiClient) -> None:
    response = api.http.put(f"{API}/sessions")
    assert response.status_code == 405, response.text
    assert error_of(response)["code"] == "method_not_allowed"
    assert allowed(response) == {"POST"}


def test_a_405_lists_every_method_the_resource_supports(api: ApiClient) -> None:
    # RFC 9110 15.5.6: a 405 "MUST generate an Allow header field ... containing a list of
    # the target resource's currently supported methods". A session is read and deleted.
    session_id = api.create_session()
    for method in ("PUT", "PATCH", "OPTIONS"):
        response = api.http.request(method, f"{API}/sessions/{session_id}")
        assert response.status_code == 405, response.text
        assert error_of(response)["code"] == "method_not_allowed"
        methods = allowed(response)
        assert {"GET", "DELETE"} <= methods <= {"GET", "HEAD", "DELETE"}, (method, response.headers.get("allow"))


def test_unknown_audio_is_404_in_the_envelope(api: ApiClient) -> None:
    for audio_id in ("0" * 32, "../conversations.db", "f" * 31):
        response = api.get(f"{API}/audio/{audio_id}")
        assert response.status_code == 404, response.text
        assert error_of(response)["code"] == "not_found"


# -- 2. a voice turn from a real audio file, and a text turn -------------------------------------------------


def espeak_wav(tmp_path: Path) -> bytes:
    out = tmp_path / "espeak.wav"
    subprocess.run(
        ["espeak-ng", "-w", str(out), "My dog is called Max and he likes long walks."], check=True, timeout=30
    )
    return out.read_bytes()


@pytest.mark.parametrize(
    "source",
    [
        "generated",
        pytest.param(
            "espeak-ng",
            marks=pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed"),
        ),
    ],
)
def test_a_voice_turn_then_a_text_turn(api: ApiClient, sims: Simulators, tmp_path: Path, source: str) -> None:
    audio = wav_file(1.5, seed=3) if source == "generated" else espeak_wav(tmp_path)
    session_id = api.create_session()

    # The browser calls it an MP3; the bytes say WAV, and the app names it after the bytes.
    voice = api.voice_turn(session_id, audio, filename="clip.mp3", content_type="audio/mpeg")
    assert voice.status_code == 200, voice.text
    turn = voice.json()
    assert set(turn) == {"turn_id", "transcript", "reply", "audio_url", "degraded", "timings_ms"}
    # The simulator refuses a file whose extension does not match its bytes (400
    # invalid_file_format): its 200 shows the file reached it named `.wav`, and the
    # transcript, derived from the bytes' hash, that the bytes arrived unchanged.
    assert sims.statuses("transcribe") == {"200": 1}
    assert turn["transcript"].startswith(f"Sim transcript {hashlib.sha256(audio).hexdigest()[:8]}: ")
    assert sims.context(turn["transcript"]) == (0, 0)
    assert turn["degraded"] == []
    assert turn["timings_ms"]["total"] > 0

    audio_url = turn["audio_url"]
    assert audio_url is not None, turn
    assert AUDIO_URL.fullmatch(audio_url), turn
    speech = api.get(audio_url)
    assert speech.status_code == 200, speech.text
    assert speech.headers["content-type"] == "audio/mpeg"
    assert speech.content[:3] == b"ID3" or (speech.content[0] == 0xFF and speech.content[1] & 0xE0 == 0xE0)
    assert parse_mp3_frames(speech.content), "no MPEG frames"

    text = api.say(session_id, "Thank you for listening.")
    assert text["transcript"] == "Thank you for listening."
    assert sims.context(text["transcript"]) == (2, 0)
    assert text["audio_url"] is not None
    assert text["audio_url"] != audio_url

    session = api.session(session_id)
    messages = session["messages"]
    assert texts(messages) == [
        ("user", turn["transcript"]),
        ("assistant", turn["reply"]),
        ("user", "Thank you for listening."),
        ("assistant", text["reply"]),
    ]
    assert [message["audio_url"] for message in messages] == [None, audio_url, None, text["audio_url"]]
    times = [message["at"] for message in messages]
    assert times == sorted(times)
    assert all(at.endswith("+00:00") for at in times)
    assert session["updated_at"] == times[-1]


# -- 3. refusals that never reach a provider -----------------------------------------------------------------


def random_bytes(size: int) -> bytes:
    return random.Random(7).randbytes(size)  # test data, not a secret


REFUSED_UPLOADS = [
    pytest.param(b"", 400, "audio_empty", id="empty"),
    pytest.param(random_bytes(4096), 415, "audio_unsupported", id="random-bytes"),
    pytest.param(wav_file(1.0)[:40], 422, "audio_undecodable", id="truncated-wav-header"),
    pytest.param(wav_file(3.0, rate=8000), 422, "audio_too_long", id="longer-than-max-seconds"),
    pytest.param(wav_file(1.1, rate=48000), 413, "audio_too_large", id="file-over-max-bytes"),
    pytest.param(wav_file(2.0, rate=48000), 413, "audio_too_large", id="body-over-max-bytes"),
]


@pytest.mark.parametrize(("audio", "status", "code"), REFUSED_UPLOADS)
def test_a_refused_upload_never_reaches_the_transcriber(
    strict_api: ApiClient, sims: Simulators, audio: bytes, status: int, code: str
) -> None:
    session_id = strict_api.create_session()
    response = strict_api.voice_turn(session_id, audio, filename="recording.wav", content_type="audio/wav")
    assert response.status_code == status, response.text
    assert error_of(response)["code"] == code
    assert sims.calls() == {"chat": 0, "transcribe": 0, "speech": 0}
    assert strict_api.session(session_id)["messages"] == []


def test_the_upload_sizes_used_above_are_what_they_claim() -> None:
    assert len(wav_file(3.0, rate=8000)) < STRICT_MAX_AUDIO_BYTES
    assert STRICT_MAX_AUDIO_BYTES < len(wav_file(1.1, rate=48000)) < STRICT_MAX_AUDIO_BYTES + 64 * 1024
    assert len(wav_file(2.0, rate=48000)) > STRICT_MAX_AUDIO_BYTES + 64 * 1024


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        pytest.param(b'{"text": ""}', "application/json", 422, "text_empty", id="empty-text"),
        pytest.param(b'{"text": "  \\n\\t "}', "application/json", 422, "text_empty", id="blank-text"),
        pytest.param(
            b'{"text": "' + b"x" * (int(STRICT_MAX_TEXT_CHARS) + 1) + b'"}',
            "application/json",
            422,
            "text_too_long",
            id="text-too-long",
        ),
        pytest.param(b'{"text": 5}', "application/json", 422, "invalid_request", id="text-not-a-string"),
        pytest.param(b'{"words": "hi"}', "application/json", 422, "invalid_request", id="no-text-field"),
        pytest.param(b"{not json", "application/json", 422, "invalid_request", id="not-json"),
        pytest.param(b"hello", "text/plain", 415, "unsupported_media_type", id="text-plain"),
        pytest.param(b"text=hello", "application/x-www-form-urlencoded", 415, "unsupported_media_type", id="form"),
        pytest.param(b"RIFF", "audio/wav", 415, "unsupported_media_type", id="raw-audio"),
    ],
)
def test_a_refused_body_never_reaches_a_provider(
    strict_api: ApiClient, sims: Simulators, body: bytes, content_type: str, status: int, code: str
) -> None:
    session_id = strict_api.create_session()
    response = strict_api.raw_turn(session_id, body, content_type)
    assert response.status_code == status, response.text
    assert error_of(response)["code"] == code
    assert sims.calls() == {"chat": 0, "transcribe": 0, "speech": 0}
    assert strict_api.session(session_id)["messages"] == []


@pytest.mark.parametrize(
    "content_type",
    ["multipart/form-data", "multipart/form-data; boundary=xyz"],
    ids=["no-boundary", "body-without-the-boundary"],
)
def test_a_broken_multipart_body_is_refused_as_such(strict_api: ApiClient, sims: Simulators, content_type: str) -> None:
    # app/api/routes.py answers a body that is not multipart 400 `invalid_request`, "The
    # upload is not valid multipart/form-data."
    session_id = strict_api.create_session()
    response = strict_api.raw_turn(session_id, b"this is not multipart", content_type)
    assert response.status_code == 400, response.text
    assert sims.calls() == {"chat": 0, "transcribe": 0, "speech": 0}
    assert error_of(response)["code"] == "invalid_request"


def test_a_form_without_the_audio_field_is_refused(strict_api: ApiClient, sims: Simulators) -> None:
    session_id = strict_api.create_session()
    response = strict_api.http.post(
        f"{API}/sessions/{session_id}/turns", files={"recording": ("a.wav", wav_file(0.5), "audio/wav")}
    )
    assert response.status_code == 422, response.text
    assert error_of(response)["code"] == "audio_missing"
    assert sims.calls() == {"chat": 0, "transcribe": 0, "speech": 0}


def test_text_at_the_limit_is_accepted(strict_api: ApiClient) -> None:
    session_id = strict_api.create_session()
    turn = strict_api.say(session_id, "y" * int(STRICT_MAX_TEXT_CHARS))
    assert turn["transcript"] == "y" * int(STRICT_MAX_TEXT_CHARS)


# -- 4. degradations -----------------------------------------------------------------------------------------


def test_speech_down_gives_a_text_reply(api: ApiClient, sims: Simulators) -> None:
    sims.fault("speech", 503)
    session_id = api.create_session()
    response = api.text_turn(session_id, "Are you there?")
    assert response.status_code == 200, response.text
    turn = response.json()
    assert turn["audio_url"] is None
    assert turn["degraded"] == ["speech"]
    assert turn["reply"] == "Yes, I'm here and listening."
    assert sims.context("Are you there?") == (0, 0)
    assert sims.statuses("speech") == {"503": 1}
    messages = api.session(session_id)["messages"]
    assert texts(messages) == [("user", "Are you there?"), ("assistant", turn["reply"])]
    assert messages[1]["audio_url"] is None


def test_transcription_down_refuses_voice_but_not_text(api: ApiClient, sims: Simulators) -> None:
    sims.fault("transcribe", 503)
    session_id = api.create_session()
    api.say(session_id, "Before the outage.")
    before = api.session(session_id)

    voice = api.voice_turn(session_id, wav_file(1.0))
    assert voice.status_code == 503, voice.text
    assert error_of(voice)["code"] == "transcription_unavailable"
    assert voice.headers["retry-after"].isdigit()
    assert api.session(session_id) == before  # nothing of the failed voice turn was kept

    text = api.say(session_id, "Typing instead.")
    assert text["degraded"] == []
    assert sims.context(text["transcript"]) == (2, 0)
    assert sims.statuses("transcribe") == {"503": 1}


def test_the_language_model_down_keeps_the_users_words(api: ApiClient, sims: Simulators) -> None:
    session_id = api.create_session()
    first = api.say(session_id, "Hello there.")
    sims.fault("chat", 503)

    response = api.text_turn(session_id, "Please remember this.")
    assert response.status_code == 503, response.text
    assert error_of(response)["code"] == "reply_unavailable"
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit(), retry_after
    assert int(retry_after) >= 1, retry_after
    assert sims.calls()["speech"] == 1  # the first turn's only

    messages = api.session(session_id)["messages"]
    assert texts(messages) == [
        ("user", "Hello there."),
        ("assistant", first["reply"]),
        ("user", "Please remember this."),
    ]

    sims.clear_faults()
    later = api.say(session_id, "Are you back?")
    # The kept words are part of the conversation the model sees.
    assert sims.context(later["transcript"]) == (3, 0)


def assert_no_address(body: str, *ports: int) -> None:
    """Readiness is public: no host, port or URL of anything behind the app in it."""
    for leak in ("127.0.0.1", "localhost", "http", *(str(port) for port in ports)):
        assert leak not in body, (leak, body)


def test_memory_store_down_degrades_the_turn(sims: Simulators, tmp_path: Path) -> None:
    qdrant_port = closed_port()
    settings = app_settings(sims, tmp_path / "data", qdrant_url=f"http://127.0.0.1:{qdrant_port}")
    with running_app(settings) as app:
        edge = start_app_edge(app.url)
        try:
            with ApiClient(edge.url) as client:
                session_id = client.create_session()
                turn = client.say(session_id, "My dog is called Max")
                assert "memory" in turn["degraded"], turn
                assert turn["audio_url"] is not None
                assert sims.context(turn["transcript"]) == (0, 0)
                again = client.say(session_id, "Do you remember my dog?")
                assert "memory" in again["degraded"]
                assert sims.context(again["transcript"]) == (2, 0)

                ready = client.get(f"{API}/ready")
                assert ready.status_code == 200, ready.text  # the memory store does not fail readiness
                assert ready.json()["checks"] == {"database": "up", "memory": "down", "embedder": "up"}
                assert set(ready.json()["breakers"]) == {"groq", "elevenlabs", "qdrant"}, ready.text
                assert_no_address(ready.text, qdrant_port, sims.groq.port, sims.elevenlabs.port)
        finally:
            edge.server.stop()


def test_a_turn_past_the_time_limit_leaves_the_session_as_it_was(strict_api: ApiClient, sims: Simulators) -> None:
    session_id = strict_api.create_session()
    strict_api.say(session_id, "First words.")
    before = strict_api.session(session_id)

    sims.fault("chat", 200, times=1, delay_ms=3000)
    started = time.monotonic()
    response = strict_api.text_turn(session_id, "These words are lost.")
    elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text
    assert error_of(response)["code"] == "turn_timeout"
    assert STRICT_TURN_TIMEOUT_S <= elapsed < 2.5, elapsed
    # docs/app.md: "a turn cut off by the timeout leaves nothing behind in the conversation".
    assert strict_api.session(session_id) == before
    # The app hung up on the slow model rather than waiting for it; nothing changed since.
    assert wait_until(lambda: sims.statuses("chat").get("499") == 1, timeout=5), sims.statuses("chat")
    assert strict_api.session(session_id) == before

    after = strict_api.say(session_id, "Trying again.")
    assert sims.context(after["transcript"]) == (2, 0)


# -- 5. continuity across a restart --------------------------------------------------------------------------


def test_a_session_survives_a_restart_of_the_app_process(sims: Simulators, tmp_path: Path) -> None:
    port = new_port()
    env = app_environment(sims, tmp_path / "data", port)
    with app_process(tmp_path / "first", env) as first:
        edge = start_app_edge(first.url)
        try:
            with ApiClient(edge.url) as client:
                session_id = client.create_session()
                client.say(session_id, "My name is Ada.")
                second_turn = client.say(session_id, "I live by the sea.")
                assert sims.context(second_turn["transcript"]) == (2, 1)
                before = client.session(session_id)
                assert len(before["messages"]) == 4
                assert first.stop() == 0, first.output()

                # A new process on the same data directory and port, behind the same edge.
                with app_process(tmp_path / "second", env) as second:
                    assert client.session(session_id) == before
                    third = client.say(session_id, "Do you remember where I live?")
                    assert sims.context(third["transcript"]) == (4, 2)
                    assert texts(client.session(session_id)["messages"])[:4] == texts(before["messages"])
                    assert second.stop() == 0, second.output()
        finally:
            edge.server.stop()


# -- 6. two app processes sharing PostgreSQL -----------------------------------------------------------------


def test_two_app_processes_share_sessions_through_postgresql(sims: Simulators, tmp_path: Path) -> None:
    # Each replica has its own data directory (the embedded memory store is one process's);
    # the conversation state is in the shared database. Started one after the other: what
    # happens when they start together is the next test's subject.
    with postgres_schema() as schema:
        database_url = schema_url(schema)
        replicas = []
        edges: list[RunningEdge] = []
        try:
            for name in ("a", "b"):
                env = app_environment(sims, tmp_path / name, new_port(), APP_DATABASE_URL=database_url)
                replicas.append(start_app_process(tmp_path / f"{name}-logs", env))
                replicas[-1].wait_until(f"{API}/health")
                edges.append(start_app_edge(replicas[-1].url))
            with ApiClient(edges[0].url) as on_a, ApiClient(edges[1].url) as on_b:
                session_id = on_a.create_session()
                try:
                    first = on_a.say(session_id, "Hello from the first replica.")
                    assert sims.context(first["transcript"]) == (0, 0)

                    seen_on_b = on_b.session(session_id)
                    assert texts(seen_on_b["messages"]) == [
                        ("user", "Hello from the first replica."),
                        ("assistant", first["reply"]),
                    ]
                    second = on_b.say(session_id, "And hello from the second.")
                    assert sims.context(second["transcript"]) == (2, 0)

                    whole = on_a.session(session_id)
                    assert texts(whole["messages"]) == [
                        ("user", "Hello from the first replica."),
                        ("assistant", first["reply"]),
                        ("user", "And hello from the second."),
                        ("assistant", second["reply"]),
                    ]
                    assert whole == on_b.session(session_id)

                    for ready in (on_a.get(f"{API}/ready"), on_b.get(f"{API}/ready")):
                        assert ready.status_code == 200, ready.text
                        assert ready.json()["checks"] == {"database": "up", "memory": "up", "embedder": "up"}
                finally:
                    deleted = on_a.delete_session(session_id)
                assert deleted.status_code == 204, deleted.text
                assert on_b.get_session(session_id).status_code == 404
                assert on_a.get_session(session_id).status_code == 404
            for replica in replicas:
                assert replica.stop() == 0, replica.output()
        finally:
            for edge in edges:
                edge.server.stop()
            for replica in replicas:
                replica.kill()


def migration_waiters(schema: str) -> int:
    """Connections waiting for a lock on `schema`'s migrations table."""
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as observer:
        row = observer.execute(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = to_regclass(%s)",
            (f"{schema}.checkpoint_migrations",),
        ).fetchone()
    return int(row[0]) if row else 0


def test_replicas_starting_together_on_a_fresh_database_all_come_up(sims: Simulators, tmp_path: Path) -> None:
    """Replicas of a deployment start at the same time, and the first deployment (or one
    that brings new checkpoint migrations) meets a database without the tables. Left to
    chance the two set-ups collided in most runs; here a transaction holds the (still
    empty) migrations table while both replicas start, so that both are in their set-up
    at the same moment every time."""
    with postgres_schema() as schema:
        database_url = schema_url(schema)
        with psycopg.connect(database_url, connect_timeout=5) as gate:
            gate.execute(AsyncPostgresSaver.MIGRATIONS[0])  # what every set-up runs first
            gate.commit()
            gate.execute("LOCK TABLE checkpoint_migrations IN ACCESS EXCLUSIVE MODE")
            replicas = [
                start_app_process(
                    tmp_path / f"{name}-logs",
                    app_environment(sims, tmp_path / name, new_port(), APP_DATABASE_URL=database_url),
                )
                for name in ("a", "b")
            ]
            try:
                # One replica waits for the table; the other polls the app's set-up lock
                # (or would wait for the table too, without it). Give the second the time
                # to get that far, then let the set-up go on.
                assert wait_until(lambda: migration_waiters(schema) >= 1, timeout=30, interval=0.1), "\n".join(
                    replica.output() for replica in replicas
                )
                time.sleep(2)
                gate.commit()
                for replica in replicas:
                    replica.wait_until(f"{API}/health")
                for replica in replicas:
                    assert replica.stop() == 0, replica.output()
            finally:
                for replica in replicas:
                    replica.kill()


# -- 7. memories stay with their session ---------------------------------------------------------------------


def test_memories_are_never_shared_across_sessions(api: ApiClient, main_app: AppThread, sims: Simulators) -> None:
    mine, theirs = api.create_session(), api.create_session()
    told = api.say(mine, "My dog is called Max")
    assert sims.context(told["transcript"]) == (0, 0)
    assert main_app.memory_count(mine) == 1
    recalled = api.say(mine, "What is my dog called?")
    assert sims.context(recalled["transcript"])[1] >= 1

    # Not a fact about the speaker, but the same subject and words: nothing of `mine` surfaces.
    for text in ("Dogs called Max are the best dogs.", "Is Max a good name for a dog?"):
        turn = api.say(theirs, text)
        assert sims.context(turn["transcript"])[1] == 0, turn
    assert main_app.memory_count(theirs) == 0
    assert main_app.memory_count(mine) == 1


# -- 8. deleting a session deletes everything it left --------------------------------------------------------


def checkpoint_rows(data_dir: Path, session_id: str) -> int:
    with sqlite3.connect(f"file:{data_dir / 'conversations.db'}?mode=ro", uri=True) as database:
        checkpoints = database.execute("SELECT count(*) FROM checkpoints WHERE thread_id = ?", (session_id,))
        writes = database.execute("SELECT count(*) FROM writes WHERE thread_id = ?", (session_id,))
        return int(checkpoints.fetchone()[0]) + int(writes.fetchone()[0])


def test_deleting_a_session_removes_its_state_memories_and_audio(api: ApiClient, main_app: AppThread) -> None:
    doomed, kept = api.create_session(), api.create_session()
    doomed_turns = [api.say(doomed, "My cat is called Tom"), api.say(doomed, "I work as a nurse")]
    kept_turn = api.say(kept, "My sister lives in Lisbon")
    assert main_app.memory_count(doomed) == 2
    assert main_app.memory_count(kept) == 1

    audio_dir = main_app.settings.data_dir / "audio"
    doomed_audio = [turn["audio_url"] for turn in doomed_turns]
    doomed_ids = []
    for url in doomed_audio:
        assert url is not None
        found = AUDIO_URL.fullmatch(url)
        assert found is not None
        doomed_ids.append(found.group(1))
        assert api.get(url).status_code == 200
    assert all(list(audio_dir.glob(f"{audio_id}.*")) for audio_id in doomed_ids)
    assert checkpoint_rows(main_app.settings.data_dir, doomed) > 0

    deleted = api.delete_session(doomed)
    assert deleted.status_code == 204, deleted.text
    assert deleted.content == b""

    gone = api.get_session(doomed)
    assert gone.status_code == 404
    assert error_of(gone)["code"] == "not_found"
    for url in doomed_audio:
        assert url is not None
        assert api.get(url).status_code == 404
    assert not any(list(audio_dir.glob(f"{audio_id}.*")) for audio_id in doomed_ids)
    assert main_app.memory_count(doomed) == 0
    assert checkpoint_rows(main_app.settings.data_dir, doomed) == 0
    assert api.text_turn(doomed, "Are you still there?").status_code == 404
    assert api.delete_session(doomed).status_code == 404

    # The other session lost nothing.
    assert main_app.memory_count(kept) == 1
    assert kept_turn["audio_url"] is not None
    assert api.get(kept_turn["audio_url"]).status_code == 200
    assert texts(api.session(kept)["messages"]) == [
        ("user", "My sister lives in Lisbon"),
        ("assistant", kept_turn["reply"]),
    ]


# -- 9. liveness and readiness -------------------------------------------------------------------------------


def test_health_and_readiness(api: ApiClient, sims: Simulators, tmp_path: Path) -> None:
    # An app whose database cannot be reached, started first: it takes its time failing.
    unreachable = f"postgresql://postgres@127.0.0.1:{closed_port()}/test"
    doomed = start_app_process(
        tmp_path, app_environment(sims, tmp_path / "data", new_port(), APP_DATABASE_URL=unreachable)
    )
    try:
        health = api.get(f"{API}/health")
        assert health.status_code == 200, health.text
        assert health.json() == {"status": "alive"}

        ready = api.get(f"{API}/ready")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["status"] == "ready"
        assert body["checks"] == {"database": "up", "memory": "up", "embedder": "up"}
        # Public: the outside services by name, never where they are.
        assert set(body["breakers"]) == {"groq", "elevenlabs"}, body
        assert set(body["breakers"].values()) <= {"closed", "open", "half_open"}
        assert_no_address(ready.text, sims.groq.port, sims.elevenlabs.port)
        assert ready.headers["cache-control"] == "no-store"

        # Meanwhile the app without a database never starts serving, and gives up.
        with httpx.Client(trust_env=False, timeout=1.0) as client, pytest.raises(httpx.TransportError):
            client.get(f"{doomed.url}{API}/ready")
        status = doomed.wait(timeout=40)
        assert status != 0, doomed.output()
        output = doomed.output()
        assert "Application startup failed" in output, output
        assert "Connection refused" in output or "connection failed" in output, output
    finally:
        doomed.kill()


# -- 10. the OpenAPI document only when enabled --------------------------------------------------------------


def test_the_openapi_document_is_served_only_when_enabled(api: ApiClient, strict_api: ApiClient) -> None:
    for path in (f"{API}/openapi.json", f"{API}/docs"):
        hidden = api.get(path)
        assert hidden.status_code == 404, (path, hidden.text)
        assert error_of(hidden)["code"] == "not_found"

    document = strict_api.get(f"{API}/openapi.json")
    assert document.status_code == 200, document.text
    spec = document.json()
    assert spec["openapi"].startswith("3.")
    assert {f"{API}/sessions", f"{API}/sessions/{{session_id}}", f"{API}/sessions/{{session_id}}/turns"} <= set(
        spec["paths"]
    )
    viewer = strict_api.get(f"{API}/docs")
    assert viewer.status_code == 200, viewer.text
    assert viewer.headers["content-type"].startswith("text/html")
