"""What the app keeps to itself, tested on the real thing: `python -m app` (or `create_app`
under uvicorn in a thread) in front of the provider simulators, real SQLite files and
embedded Qdrant files on disk, real PostgreSQL, an OTLP collector on a loopback socket.

- Session ids and audio ids are capabilities: none reaches a log line (at debug level,
  third-party loggers included), a span or a metric label.
- The data directory and everything in it are owner-only (0700 / 0600), also when an older
  version left it readable.
- A deleted session - by DELETE or by the retention sweep - leaves none of its words in any
  file of the data directory once the deletion returns, and no row in PostgreSQL.
- No redirect is built from the client's Host: a trailing-slash path is a 404.

Readiness without addresses is tested with the rest of readiness in test_app_e2e.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import sqlite3
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from app.observability import RedactCapabilities, record_exception
from common.logs import JsonFormatter
from common.redaction import REDACTED
from tests.app_support import (
    API,
    ApiClient,
    AppThread,
    Simulators,
    app_environment,
    app_process,
    app_settings,
    error_of,
    new_port,
    postgres_schema,
    running_app,
    schema_url,
)
from tests.processes import PROJECT_ROOT, edge_process
from tests.servers import ServerThread, serve
from tests.telemetry_support import OtlpCollector
from tests.wire import WireClient

# Said once, in one session only: its words must be nowhere once that session is deleted.
# The simulator echoes it in the reply and stores it, in the third person, as a memory.
SENTENCE = "My tortoise Quillfeather sleeps under the marmalade lantern"
MARKERS = (SENTENCE.encode(), b"Quillfeather", b"marmalade lantern")
SHIPPED_POLICY = PROJECT_ROOT / "config" / "edge-policy.toml"


@pytest.fixture(autouse=True)
def fresh_sims(sims: Simulators) -> None:
    sims.reset()


def audio_id_of(url: str | None) -> str:
    assert url is not None
    assert url.startswith(f"{API}/audio/"), url
    return url.rsplit("/", 1)[1]


# -- 1. capability ids stay out of logs, spans and metrics ---------------------------------------------------


@pytest.fixture
def telemetry_sink() -> Iterator[tuple[ServerThread, OtlpCollector]]:
    sink = OtlpCollector()
    server = serve(sink, log_config=None)
    yield server, sink
    server.stop()


def test_no_capability_id_reaches_a_log_line_a_span_or_a_metric(
    sims: Simulators, tmp_path: Path, telemetry_sink: tuple[ServerThread, OtlpCollector]
) -> None:
    """The whole stack as `make run` wires it - the edge with the shipped policy in front of
    `python -m app`, both exporting spans to one collector and serving /metrics, both
    logging at debug level."""
    server, sink = telemetry_sink
    edge_port, edge_metrics, app_metrics = new_port(), new_port(), new_port()
    otel = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{server.url}/v1/traces", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    env = app_environment(
        sims,
        tmp_path / "data",
        new_port(),
        APP_LOG_LEVEL="debug",  # every level, every logger: aiosqlite's debug lines carry statement parameters
        # What an operator may set to have FastAPI's own telemetry export too.
        FASTAPI_OTEL_AUTO_CONFIGURE="true",
        APP_METRICS_PORT=str(app_metrics),
        **otel,
    )
    with app_process(tmp_path / "logs", env) as app:
        edge_env = {
            "EDGE_PORT": str(edge_port),
            "EDGE_UPSTREAM_URL": app.url,
            "EDGE_POLICY_FILE": str(SHIPPED_POLICY),
            "EDGE_LOG_LEVEL": "debug",
            "EDGE_METRICS_PORT": str(edge_metrics),
            **otel,
        }
        with edge_process(tmp_path / "logs", edge_port, edge_env) as edge, ApiClient(edge.url) as client:
            session_id, audio_id = exercise_and_delete_a_session(client)
            scraped = [
                httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5, trust_env=False).text
                for port in (edge_metrics, app_metrics)
            ]
            assert edge.stop() == 0, edge.output()
            edge_output = edge.output()
        assert app.stop() == 0, app.output()  # flushes the spans and metrics still buffered
        output = app.output()

    for capability in (session_id, audio_id):
        assert capability not in output, f"{capability} in the app's output"
        assert capability not in edge_output, f"{capability} in the edge's output"
    access = [json.loads(line) for line in edge_output.splitlines() if '"edge.access"' in line]
    assert f"{API}/sessions/{{redacted}}/turns" in {line["path"] for line in access}, edge_output[-3000:]
    lines = [json.loads(line) for line in app.stdout().splitlines() if line.startswith("{")]
    # The log really was at debug level, and a library's line that held an id was redacted.
    assert any(line["logger"] == "aiosqlite" and REDACTED in line["message"] for line in lines), output[-3000:]

    spans = sink.spans()
    server_spans = [span for span in spans if span.span.kind == Span.SPAN_KIND_SERVER]
    routes = {span.attributes.get("http.route") for span in server_spans}
    assert {
        f"{API}/sessions",
        f"{API}/sessions/{{session_id}}",
        f"{API}/sessions/{{session_id}}/turns",
        f"{API}/audio/{{audio_id}}",
        f"{API}/health",
    } <= routes, routes
    assert f"DELETE {API}/sessions/{{session_id}}" in {span.span.name for span in server_spans}
    app_spans = [span for span in spans if span.resource.get("service.name") != "edge"]
    assert not [span for span in app_spans if "url.path" in span.attributes]
    edge_paths = {span.attributes.get("url.path") for span in spans if span.resource.get("service.name") == "edge"}
    assert f"{API}/audio/{{redacted}}" in edge_paths, edge_paths
    assert "app_outbound_calls_total" in scraped[1]
    assert "http_server_request_duration_seconds_count" in scraped[0]
    for text in [*map(str, sink.exports), *scraped]:  # every span, event, attribute; every series and label
        assert session_id not in text, text[:2000]
        assert audio_id not in text, text[:2000]


def exercise_and_delete_a_session(client: ApiClient) -> tuple[str, str]:
    """Every route that carries an id, then the deletion and what follows it; the ids."""
    session_id = client.create_session()
    turn = client.say(session_id, "My dog is called Max")  # a memory too: a collection named after the session
    audio_url = turn["audio_url"]
    audio_id = audio_id_of(audio_url)
    assert client.get(f"{audio_url}").status_code == 200
    assert client.session(session_id)["messages"]
    assert client.delete_session(session_id).status_code == 204
    # What follows a deletion names nothing either, to the client or in the log.
    for gone in (client.get_session(session_id), client.get(f"{audio_url}"), client.text_turn(session_id, "hi")):
        assert gone.status_code == 404, gone.text
        assert error_of(gone)["code"] == "not_found"
        assert session_id not in gone.text
        assert audio_id not in gone.text
    return session_id, audio_id


def test_the_log_filter_redacts_ids_in_messages_and_tracebacks_only() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactCapabilities())
    log = logging.getLogger("tests.redaction")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    session_id, audio_id = secrets.token_urlsafe(24), uuid.uuid4().hex
    try:
        log.debug("executing %s", ("SELECT * FROM checkpoints WHERE thread_id = ?", (session_id,)))
        try:
            raise ValueError(f"Collection memories-{session_id} not found")
        except ValueError:
            log.exception("reply %s.mp3 failed", audio_id, extra={"turn": 3})
        log.info("12 sessions deleted", extra={"sessions_deleted": 12})
    finally:
        log.removeHandler(handler)

    text = stream.getvalue()
    assert session_id not in text, text
    assert audio_id not in text, text
    statement, failure, sweep = (json.loads(line) for line in text.splitlines())
    assert statement["message"] == f"executing ('SELECT * FROM checkpoints WHERE thread_id = ?', ('{REDACTED}',))"
    assert failure["message"] == f"reply {REDACTED}.mp3 failed"
    assert failure["exception"].startswith("Traceback (most recent call last):"), failure
    assert failure["exception"].endswith(f"ValueError: Collection {REDACTED} not found"), failure
    assert failure["turn"] == 3
    assert (sweep["message"], sweep["sessions_deleted"]) == ("12 sessions deleted", 12)


def test_a_recorded_exception_is_redacted_on_its_span() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    session_id = secrets.token_urlsafe(24)
    span = provider.get_tracer("tests").start_span("GET")
    try:
        raise KeyError(f"no thread {session_id}")
    except KeyError as error:
        record_exception(span, error)
    span.end()
    (finished,) = exporter.get_finished_spans()
    (event,) = finished.events
    assert event.name == "exception"
    attributes = dict(event.attributes or {})
    assert attributes["exception.type"] == "KeyError"
    assert attributes["exception.message"] == f"'no thread {REDACTED}'"
    assert f"KeyError: 'no thread {REDACTED}'" in str(attributes["exception.stacktrace"])
    assert session_id not in str(attributes)


# -- 3. the data directory is owner-only ---------------------------------------------------------------------


@contextlib.contextmanager
def permissive_umask() -> Iterator[None]:
    """The usual umask 022 while a process is started (it inherits it): what the app must
    not rely on."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def not_owner_only(root: Path) -> list[str]:
    """Every directory under `root` (itself included) not 0700 and every file not 0600;
    symbolic links are not followed."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        with contextlib.suppress(FileNotFoundError):  # a journal file that came and went
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                continue
            expected = 0o700 if stat.S_ISDIR(mode) else 0o600
            if stat.S_IMODE(mode) != expected:
                wrong.append(f"{path.relative_to(root)}: {oct(stat.S_IMODE(mode))}")
    return wrong


def take_turns(url: str) -> None:
    """Turns that make every kind of file: checkpoints, memories, reply audio."""
    with ApiClient(url) as client:
        session_id = client.create_session()
        first = client.say(session_id, "My dog is called Max")
        client.say(session_id, "I work as a nurse")
        assert client.get(f"{first['audio_url']}").status_code == 200


def test_a_fresh_data_directory_is_owner_only(sims: Simulators, tmp_path: Path) -> None:
    data_dir = tmp_path / "data" / "app"  # its parent does not exist either
    env = app_environment(sims, data_dir, new_port())
    with permissive_umask(), app_process(tmp_path / "logs", env) as app:
        take_turns(app.url)
        created = {str(path.relative_to(data_dir)) for path in data_dir.rglob("*")}
        assert {"conversations.db", "conversations.db-wal", "conversations.db-shm", "qdrant/meta.json"} <= created
        assert any(name.startswith("audio/") and name.endswith(".mp3") for name in created), created
        assert any(name.endswith("/storage.sqlite") for name in created), created
        assert not_owner_only(data_dir) == []
        assert app.stop() == 0, app.output()
        assert not_owner_only(data_dir) == []


def test_a_data_directory_left_readable_by_an_older_version_is_made_owner_only(
    sims: Simulators, tmp_path: Path
) -> None:
    volume = tmp_path / "volume"  # APP_DATA_DIR is a link to it, as to a mounted volume
    outside = tmp_path / "not-ours.txt"
    with permissive_umask():
        (volume / "audio").mkdir(parents=True)
        (volume / "qdrant" / "collection").mkdir(parents=True)
        sqlite3.connect(volume / "conversations.db").close()
        (volume / "audio" / f"{uuid.uuid4().hex}.mp3").write_bytes(b"ID3")
        outside.write_text("someone else's")
    (volume / "elsewhere").symlink_to(outside)
    (tmp_path / "data").symlink_to(volume)
    assert len(not_owner_only(volume)) == 6  # four directories and two files, as umask 022 made them
    env = app_environment(sims, tmp_path / "data", new_port())
    with permissive_umask(), app_process(tmp_path / "logs", env) as app:
        assert not_owner_only(volume) == []  # at start-up, before any turn
        take_turns(app.url)
        assert not_owner_only(volume) == []
        assert stat.S_IMODE(outside.stat().st_mode) == 0o644  # a link inside is not followed out of it


# -- 4. a deleted session leaves none of its words on disk ---------------------------------------------------


def files_holding(root: Path, marker: bytes) -> list[str]:
    return sorted(
        str(path.relative_to(root)) for path in root.rglob("*") if path.is_file() and marker in path.read_bytes()
    )


def say_the_sentence(app: AppThread) -> str:
    """A session that says SENTENCE, which is then on disk in the checkpoints and the memories."""
    with ApiClient(app.url) as client:
        session_id = client.create_session()
        turn = client.say(session_id, SENTENCE)
    assert "memory" not in turn["degraded"], turn
    assert app.memory_count(session_id) == 1
    holding = files_holding(app.settings.data_dir, b"Quillfeather")
    assert any(name.startswith("conversations.db") for name in holding), holding
    assert any(name.startswith("qdrant/") for name in holding), holding
    return session_id


def deleted_but_open(root: Path) -> list[str]:
    """Files under `root` deleted but still held open by this process (where the app runs):
    still on disk, their contents with them."""
    held = []
    for descriptor in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            target = os.readlink(descriptor)
            if target.startswith(str(root)) and target.endswith(" (deleted)"):
                held.append(target)
    return held


def assert_no_word_left(data_dir: Path) -> None:
    for marker in MARKERS:
        assert files_holding(data_dir, marker) == [], marker
    wal = data_dir / "conversations.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    assert deleted_but_open(data_dir) == []


def test_a_deleted_session_leaves_none_of_its_words_in_the_data_directory(sims: Simulators, tmp_path: Path) -> None:
    with running_app(app_settings(sims, tmp_path / "data")) as app, ApiClient(app.url) as client:
        kept = client.create_session()
        client.say(kept, "My sister lives in Lisbon")
        doomed = say_the_sentence(app)
        deleted = client.delete_session(doomed)
        assert deleted.status_code == 204, deleted.text
        assert_no_word_left(app.settings.data_dir)
        # The rest of the database is intact.
        assert files_holding(app.settings.data_dir, b"Lisbon")
        assert client.session(kept)["messages"][0]["text"] == "My sister lives in Lisbon"


def test_the_retention_sweep_leaves_none_of_a_sessions_words_either(sims: Simulators, tmp_path: Path) -> None:
    settings = app_settings(sims, tmp_path / "data", session_retention_days=1e-9)  # every session is idle
    with running_app(settings) as app:
        doomed = say_the_sentence(app)
        assert len(app.run(app.companion.sweep()).sessions) == 1
        with ApiClient(app.url) as client:
            assert client.get_session(doomed).status_code == 404
        assert_no_word_left(app.settings.data_dir)


CHECKPOINT_TABLES = ("checkpoints", "checkpoint_blobs", "checkpoint_writes")


def rows_of(database_url: str, session_id: str) -> dict[str, int]:
    counts = {}
    with psycopg.connect(database_url, connect_timeout=5) as connection:
        for table in CHECKPOINT_TABLES:
            row = connection.execute(f"SELECT count(*) FROM {table} WHERE thread_id = %s", (session_id,)).fetchone()
            counts[table] = int(row[0]) if row else 0
    return counts


def test_a_deleted_session_leaves_no_row_in_postgresql(sims: Simulators, tmp_path: Path) -> None:
    """Dead tuples stay until VACUUM (docs/app.md); no live row of the session remains."""
    with postgres_schema() as schema:
        database_url = schema_url(schema)
        settings = app_settings(sims, tmp_path / "data", database_url=database_url)
        with running_app(settings) as app, ApiClient(app.url) as client:
            session_id = client.create_session()
            client.say(session_id, SENTENCE)
            before = rows_of(database_url, session_id)
            assert before["checkpoints"] > 0, before
            assert before["checkpoint_blobs"] > 0, before
            assert client.delete_session(session_id).status_code == 204
            assert rows_of(database_url, session_id) == dict.fromkeys(CHECKPOINT_TABLES, 0)
            assert files_holding(settings.data_dir, b"Quillfeather") == []  # memories and audio: files


# -- 5. no redirect is built from the Host header ------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_app(sims: Simulators, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppThread]:
    with running_app(app_settings(sims, tmp_path_factory.mktemp("plain-app"))) as app:
        yield app


def raw_request(app: AppThread, method: str, path: str, host: bytes) -> Any:
    with WireClient(app.server.port) as wire:
        wire.send(f"{method} {path} HTTP/1.1\r\n".encode() + b"Host: " + host + b"\r\nContent-Length: 0\r\n\r\n")
        return wire.read_response()


def test_a_trailing_slash_is_a_404_never_a_redirect_from_the_host_header(plain_app: AppThread) -> None:
    with ApiClient(plain_app.url) as client:
        session_id = client.create_session()
    hostile = b"attacker.example"
    for method, path in (
        ("GET", f"{API}/health/"),
        ("POST", f"{API}/sessions/"),
        ("GET", f"{API}/sessions/{session_id}/"),  # a redirect would also have repeated the id
        ("DELETE", f"{API}/sessions/{session_id}/"),
    ):
        response = raw_request(plain_app, method, path, hostile)
        assert response.status == 404, (method, path, response.head)
        assert response.values("location") == [], response.head
        assert hostile not in response.head + response.body
        assert session_id.encode() not in response.head + response.body
        body = response.json()
        assert body["error"]["code"] == "not_found", body
        assert body["error"]["request_id"] == response.values("x-request-id")[0].decode()
    # The spelling the API lists still answers, whatever the Host said, and the session is still there.
    assert raw_request(plain_app, "GET", f"{API}/health", hostile).status == 200
    assert raw_request(plain_app, "GET", f"{API}/sessions/{session_id}", hostile).status == 200
