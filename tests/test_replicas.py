"""A session's turns, one at a time across app replicas (docs/app.md#several-replicas).

Two `python -m app` processes share one PostgreSQL database (a schema of their own in the
test database) and nothing else: each has its own data directory, as replicas on two
hosts have, and long-term memory is off (the embedded store is one process's). The
simulated model is slowed (`PUT /_sim/latency`) so that a turn sent to one replica is
still under way when the next turn of the same session reaches the other. What shows
the order from the outside: the simulator records how many messages the model was given
for each reply (`GET /_sim/chats`), and its access log when each model call came and went,
with the request id of the turn it served.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import httpx
import psycopg
import pytest

from app.storage.session_lock import lock_key
from tests.app_support import (
    API,
    ApiClient,
    MessageBody,
    SessionBody,
    Simulators,
    TurnBody,
    app_environment,
    app_settings,
    error_of,
    new_port,
    postgres_schema,
    running_app,
    schema_url,
    start_app_process,
)
from tests.processes import ServiceProcess
from tests.servers import wait_until
from tests.telemetry_support import LineCapture

CHAT_LATENCY_MS = 1500
CHAT_PATH = "/openai/v1/chat/completions"

pytestmark = pytest.mark.usefixtures("fresh_sims")


def texts(messages: list[MessageBody]) -> list[tuple[str, str]]:
    return [(message["role"], message["text"]) for message in messages]


def take_turn(client: ApiClient, session_id: str, text: str, request_id: str) -> httpx.Response:
    return client.http.post(
        f"{API}/sessions/{session_id}/turns", json={"text": text}, headers={"x-request-id": request_id}
    )


def turn_body(response: httpx.Response) -> TurnBody:
    assert response.status_code == 200, response.text
    return cast(TurnBody, response.json())


def set_chat_latency(sims: Simulators, milliseconds: int) -> None:
    httpx.put(f"{sims.groq.url}/_sim/latency", json={"chat": milliseconds}, trust_env=False).raise_for_status()


def wait_for_chat_calls(sims: Simulators, count: int) -> None:
    """Until the model has been called `count` times: a turn is in its reply, holding its session."""
    assert wait_until(lambda: sims.calls()["chat"] >= count, timeout=10, interval=0.01)


@dataclass(frozen=True)
class ModelCall:
    request_id: str
    started: float  # wall-clock seconds, as the simulator saw the call come
    ended: float  # and its answer go


@contextmanager
def model_calls() -> Iterator[list[ModelCall]]:
    """The chat calls the simulators' access log records while entered (they run in this
    process), each with the request id of the turn that made it."""
    capture = LineCapture()
    access = logging.getLogger("sim.access")
    previous_level = access.level
    access.setLevel(logging.INFO)
    access.addHandler(capture)
    calls: list[ModelCall] = []
    try:
        yield calls
    finally:
        access.removeHandler(capture)
        access.setLevel(previous_level)
        for line in capture.lines:
            fields = line.fields
            if fields["path"] == CHAT_PATH:
                ended = line.record.created
                calls.append(ModelCall(fields["request_id"], ended - fields["duration_ms"] / 1000, ended))


def rows_of(database_url: str, session_id: str, audio_id: str) -> dict[str, int]:
    """Live rows the session left in the shared database."""
    with psycopg.connect(database_url, connect_timeout=5) as connection:
        counts = {
            table: connection.execute(f"SELECT count(*) FROM {table} WHERE thread_id = %s", (session_id,)).fetchone()
            for table in ("checkpoints", "checkpoint_blobs", "checkpoint_writes")
        }
        counts["reply_audio"] = connection.execute(
            "SELECT count(*) FROM reply_audio WHERE audio_id = %s", (audio_id,)
        ).fetchone()
    return {table: int(row[0]) if row else 0 for table, row in counts.items()}


def audio_id_of(turn: TurnBody) -> str:
    url = turn["audio_url"]
    assert url is not None, turn
    assert url.startswith(f"{API}/audio/"), url
    return url.removeprefix(f"{API}/audio/")


# -- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    with postgres_schema() as schema:
        yield schema_url(schema)


def replica_environment(sims: Simulators, data_dir: Path, database_url: str) -> dict[str, str]:
    return app_environment(
        sims, data_dir, new_port(), APP_DATABASE_URL=database_url, APP_REPLICAS="2", APP_FEATURE_MEMORY="false"
    )


@pytest.fixture(scope="module")
def replicas(
    sims: Simulators, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    started = []
    try:
        for name in ("a", "b"):
            directory = tmp_path_factory.mktemp(f"replica-{name}")
            started.append(
                start_app_process(directory / "logs", replica_environment(sims, directory / "data", database_url))
            )
        for replica in started:
            replica.wait_until(f"{API}/health")
        yield started[0], started[1]
        for replica in started:
            assert replica.stop() == 0, replica.output()
    finally:
        for replica in started:
            replica.kill()


@pytest.fixture
def on_a(replicas: tuple[ServiceProcess, ServiceProcess]) -> Iterator[ApiClient]:
    with ApiClient(replicas[0].url) as client:
        yield client


@pytest.fixture
def on_b(replicas: tuple[ServiceProcess, ServiceProcess]) -> Iterator[ApiClient]:
    with ApiClient(replicas[1].url) as client:
        yield client


# -- two turns of one session, one on each replica -----------------------------------------------------------


@dataclass(frozen=True)
class OverlappingTurns:
    session_id: str
    first: TurnBody  # sent to replica A
    second: TurnBody  # sent to replica B while the first was under way
    second_sent: float  # wall-clock seconds
    on_a: SessionBody  # the conversation afterwards, as each replica reads it
    on_b: SessionBody
    calls: list[ModelCall]
    contexts: tuple[tuple[int, int], tuple[int, int]]  # what the model was given for each reply

    def calls_of(self, turn: str) -> list[ModelCall]:
        found = [call for call in self.calls if call.request_id == f"{turn}-{self.session_id[:8]}"]
        assert found, (turn, self.calls)
        return found


@pytest.fixture(scope="module")
def overlapping_turns(sims: Simulators, replicas: tuple[ServiceProcess, ServiceProcess]) -> Iterator[OverlappingTurns]:
    sims.reset()
    with ApiClient(replicas[0].url) as on_a, ApiClient(replicas[1].url) as on_b:
        session_id = on_a.create_session()
        tag = session_id[:8]  # one request id per turn, different in every run
        set_chat_latency(sims, CHAT_LATENCY_MS)
        with model_calls() as calls, ThreadPoolExecutor(1) as pool:
            first = pool.submit(take_turn, on_a, session_id, "Hello from the first replica.", f"first-{tag}")
            wait_for_chat_calls(sims, 1)
            second_sent = time.time()
            second = take_turn(on_b, session_id, "And hello from the second.", f"second-{tag}")
            turns = OverlappingTurns(
                session_id,
                turn_body(first.result(timeout=30)),
                turn_body(second),
                second_sent,
                on_a.session(session_id),
                on_b.session(session_id),
                calls,
                (sims.context("Hello from the first replica."), sims.context("And hello from the second.")),
            )
        set_chat_latency(sims, 0)
        yield turns
        on_a.delete_session(session_id)


def test_two_concurrent_turns_on_two_replicas_both_count(overlapping_turns: OverlappingTurns) -> None:
    """No lost update: the second turn was given the first's messages, and the conversation
    keeps both turns in order, the same on both replicas."""
    turns = overlapping_turns
    assert turns.contexts == ((0, 0), (2, 0))
    assert texts(turns.on_a["messages"]) == [
        ("user", "Hello from the first replica."),
        ("assistant", turns.first["reply"]),
        ("user", "And hello from the second."),
        ("assistant", turns.second["reply"]),
    ]
    assert turns.on_b == turns.on_a


def test_the_second_replica_waits_for_the_first_turn_to_end(overlapping_turns: OverlappingTurns) -> None:
    """The second turn reached its replica while the first's model call ran, and made its
    own model call only after the first turn's last one had been answered."""
    first, second = overlapping_turns.calls_of("first"), overlapping_turns.calls_of("second")
    first_ended = max(call.ended for call in first)
    assert overlapping_turns.second_sent < first_ended, (overlapping_turns.second_sent, first)
    assert min(call.started for call in second) > first_ended, (first, second)


def test_reply_audio_made_on_one_replica_is_served_by_the_other(
    overlapping_turns: OverlappingTurns, on_a: ApiClient, on_b: ApiClient
) -> None:
    for turn in (overlapping_turns.first, overlapping_turns.second):
        url = turn["audio_url"]
        assert url is not None, turn
        made, served = on_a.get(url), on_b.get(url)
        assert made.status_code == 200, made.text
        assert served.status_code == 200, served.text
        assert served.headers["content-type"] == made.headers["content-type"] == "audio/mpeg"
        assert served.content == made.content
        assert served.content


def test_reply_audio_in_postgresql_is_swept_after_its_retention(sims: Simulators, tmp_path: Path) -> None:
    with postgres_schema() as schema:  # a database of its own: the sweep takes all audio past its time
        database_url = schema_url(schema)
        settings = app_settings(
            sims, tmp_path / "data", database_url=database_url, audio_retention_hours=1e-9, feature_memory=False
        )
        with running_app(settings) as app, ApiClient(app.url) as client:
            session_id = client.create_session()
            turn = client.say(session_id, "Say it out loud.")
            audio_url = turn["audio_url"]
            assert audio_url is not None, turn
            assert client.get(audio_url).status_code == 200
            report = app.run(app.companion.sweep())
            assert (len(report.sessions), report.audio) == (0, 1), report
            assert client.get(audio_url).status_code == 404
            assert rows_of(database_url, session_id, audio_id_of(turn))["reply_audio"] == 0
            assert client.session(session_id)["messages"][1]["text"] == turn["reply"]


# -- deletion while a turn runs on the other replica ---------------------------------------------------------


def lock_waiters(database_url: str, session_id: str) -> int:
    """Connections waiting for the session's lock (PostgreSQL shows a 64-bit key as its two
    halves)."""
    key = lock_key(session_id) & 0xFFFF_FFFF_FFFF_FFFF
    with psycopg.connect(database_url, connect_timeout=5) as observer:
        row = observer.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 1",
            (key >> 32, key & 0xFFFF_FFFF),
        ).fetchone()
    return int(row[0]) if row else 0


def test_deleting_a_session_waits_for_its_turn_on_the_other_replica(
    sims: Simulators, on_a: ApiClient, on_b: ApiClient, database_url: str
) -> None:
    """Deleted on B while A's turn was under way: the turn ends first (its reply and audio
    are made), then everything goes, the turn's audio too, and the turn does not bring the
    session back by saving its state after the deletion. A next turn on A, sent while the
    deletion waited, finds no session and leaves nothing behind."""
    session_id = on_a.create_session()
    tag = session_id[:8]
    set_chat_latency(sims, CHAT_LATENCY_MS)
    with model_calls() as calls, ThreadPoolExecutor(2) as pool:
        turn = pool.submit(take_turn, on_a, session_id, "Please forget me.", f"doomed-{tag}")
        wait_for_chat_calls(sims, 1)
        deletion = pool.submit(on_b.delete_session, session_id)
        assert wait_until(lambda: lock_waiters(database_url, session_id) == 1, timeout=10, interval=0.01)
        late = take_turn(on_a, session_id, "Are you still there?", f"late-{tag}")
        answered = turn_body(turn.result(timeout=30))
        deleted = deletion.result(timeout=30)
    assert deleted.status_code == 204, deleted.text
    assert late.status_code == 404, late.text
    assert error_of(late)["code"] == "not_found"
    audio_url = answered["audio_url"]
    assert audio_url is not None, answered
    for client in (on_a, on_b):
        assert client.get_session(session_id).status_code == 404
        assert client.get(audio_url).status_code == 404
    assert set(rows_of(database_url, session_id, audio_id_of(answered)).values()) == {0}
    assert {call.request_id for call in calls} == {f"doomed-{tag}"}  # the late turn never reached the model


# -- a session held elsewhere --------------------------------------------------------------------------------


@contextmanager
def session_held(database_url: str, session_id: str) -> Iterator[None]:
    """The session's lock, held as a replica running one of its turns holds it."""
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (lock_key(session_id),))
        yield


def test_a_turn_that_cannot_have_its_session_in_time_times_out(
    sims: Simulators, database_url: str, tmp_path: Path
) -> None:
    """A replica with a 1 s turn budget meets a session another holds: the turn's own
    timeout answer, nothing asked of the model; a deletion is refused as busy. Once the
    session is free the same replica takes its turns as usual."""
    settings = app_settings(
        sims, tmp_path / "data", database_url=database_url, turn_timeout_s=1.0, feature_memory=False
    )
    with running_app(settings) as app, ApiClient(app.url) as client:
        session_id = client.create_session()
        with session_held(database_url, session_id):
            timed_out = client.text_turn(session_id, "Anyone there?")
            assert timed_out.status_code == 504, timed_out.text
            assert error_of(timed_out)["code"] == "turn_timeout"
            busy = client.delete_session(session_id)
            assert busy.status_code == 503, busy.text
            assert error_of(busy)["code"] == "session_busy"
            assert busy.headers["retry-after"] == "5"
        assert sims.calls()["chat"] == 0
        assert client.session(session_id)["messages"] == []
        for text in ("Now?", "And again?"):  # the lock's connections are left as they were
            assert client.say(session_id, text)
        assert client.delete_session(session_id).status_code == 204


def test_a_replica_killed_mid_turn_leaves_the_session_free(
    sims: Simulators, on_b: ApiClient, database_url: str, tmp_path: Path
) -> None:
    """Its lock dies with its database connections: the other replica takes the session's
    next turn, which finds the session as it was before the lost one."""
    doomed = start_app_process(tmp_path / "logs", replica_environment(sims, tmp_path / "data", database_url))
    try:
        doomed.wait_until(f"{API}/health")
        with ApiClient(doomed.url) as on_doomed:
            session_id = on_doomed.create_session()
            set_chat_latency(sims, CHAT_LATENCY_MS)
            with ThreadPoolExecutor(1) as pool:
                lost = pool.submit(take_turn, on_doomed, session_id, "Lost words.", f"lost-{session_id[:8]}")
                wait_for_chat_calls(sims, 1)
                doomed.kill()
                with pytest.raises(httpx.TransportError):
                    lost.result(timeout=30)
    finally:
        doomed.kill()
    set_chat_latency(sims, 0)
    after = on_b.say(session_id, "Still here?")
    assert sims.context(after["transcript"]) == (0, 0)
    assert texts(on_b.session(session_id)["messages"]) == [("user", "Still here?"), ("assistant", after["reply"])]
    assert on_b.delete_session(session_id).status_code == 204


def test_lock_keys_are_64_bit_and_differ_per_session() -> None:
    ids = {uuid.uuid4().hex for _ in range(1000)}
    keys = {lock_key(session_id) for session_id in ids}
    assert len(keys) == len(ids)
    assert all(-(2**63) <= key < 2**63 for key in keys)
    assert any(key < 0 for key in keys)
    assert any(key >= 2**31 for key in keys)
