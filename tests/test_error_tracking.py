"""Error tracking (docs/error-tracking.md): the edge and the app send their errors to Sentry,
scrubbed of what people said, of keys and of capability ids.

A Sentry of our own on loopback receives the envelopes the SDK posts for a DSN
`http://public@127.0.0.1:PORT/1` (gzip-encoded, or brotli when it is installed). The app and
the edge run for real and fail for real: the app's reply audio directory is removed under
it (its turn fails writing the reply's audio, an error nothing handles), and the edge is
pointed at an upstream whose name the resolver cannot even encode (an error the proxy does
not expect). The SDK is closed after each test: the tests share the process.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sentry_sdk
from pydantic import SecretStr
from starlette.types import Receive, Scope, Send

from common.error_tracking import (
    FILTERED,
    default_release,
    dsn_of,
    init_error_tracking,
    scrub_breadcrumb,
    scrub_event,
)
from common.settings import ConfigurationError, Environment, load
from edge.settings import EdgeSettings
from tests.app_support import (
    API,
    ApiClient,
    Simulators,
    app_environment,
    app_process,
    app_settings,
    new_port,
    running_app,
)
from tests.processes import PROJECT_ROOT
from tests.servers import ServerThread, closed_port, running_edge, serve, wait_until
from tests.sim_support import ELEVEN_KEY, GROQ_KEY

# What must never reach Sentry.
TRANSCRIPT = "I still set two cups out every morning since Marguerite died"
SESSION_ID = "Zq8_vK3-pL0mWx7RtYb2NcHs5dFgJu4e"  # 32 URL-safe characters, as a session id is
AUDIO_ID = "3f9c2b7a1e6d4c8b9a0f1e2d3c4b5a69"  # 32 hex digits, as an audio id is
BEARER = "sk-live-groq-3b1f9a7c5e2d4f6a8b0c"
XI_KEY = "xi-elevenlabs-7d3e1c9b5a2f4e6d"
COOKIE = "companion_session=0a1b2c3d4e5f"


# -- a Sentry on loopback ----------------------------------------------------------------------


@dataclass
class Envelope:
    raw: bytes
    header: dict[str, Any]
    items: list[tuple[dict[str, Any], bytes]]

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(payload) for header, payload in self.items if header.get("type") == "event"]


def parse_envelope(raw: bytes) -> Envelope:
    """Sentry's envelope format: a header line, then items of a header line and a payload
    (of the header's `length`, or up to the next newline)."""
    header_line, _, rest = raw.partition(b"\n")
    items = []
    while rest:
        item_line, _, rest = rest.partition(b"\n")
        if not item_line.strip():
            continue
        item_header = json.loads(item_line)
        length = item_header.get("length")
        if length is None:
            payload, _, rest = rest.partition(b"\n")
        else:
            payload, rest = rest[:length], rest[length + 1 :]
        items.append((item_header, payload))
    return Envelope(raw, json.loads(header_line), items)


def decode(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "br":
        import brotli  # type: ignore[import-not-found]  # only when installed; the SDK uses it then

        return bytes(brotli.decompress(body))
    if encoding == "deflate":
        return zlib.decompress(body)
    assert encoding == "", f"unexpected content-encoding {encoding!r}"
    return body


@dataclass
class SentryServer:
    """Records every envelope posted to `/api/1/envelope/`."""

    envelopes: list[Envelope] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        self.paths.append(scope["path"])
        if scope["method"] == "POST" and scope["path"] == "/api/1/envelope/":
            self.envelopes.append(parse_envelope(decode(body, headers.get("content-encoding", ""))))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    def events(self) -> list[dict[str, Any]]:
        return [event for envelope in self.envelopes for event in envelope.events()]

    def raw(self) -> bytes:
        return b"\n".join(envelope.raw for envelope in self.envelopes)

    def clear(self) -> None:
        self.envelopes.clear()
        self.paths.clear()


@dataclass
class RunningSentry:
    server: ServerThread
    recorder: SentryServer

    @property
    def dsn(self) -> str:
        return f"http://public@127.0.0.1:{self.server.port}/1"


@pytest.fixture(scope="module")
def sentry_server() -> Iterator[RunningSentry]:
    recorder = SentryServer()
    server = serve(recorder)
    yield RunningSentry(server, recorder)
    server.stop()


@pytest.fixture
def sentry(sentry_server: RunningSentry, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningSentry]:
    """The loopback Sentry, its record empty; the SDK closed and forgotten afterwards."""
    for name in ("SENTRY_DSN", "SENTRY_RELEASE", "SENTRY_ENVIRONMENT"):
        monkeypatch.delenv(name, raising=False)  # the developer's own must not count
    sentry_server.recorder.clear()
    try:
        yield sentry_server
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)
        # What this test's own HTTP calls left (breadcrumbs) must not reach the next test's events.
        for scope in (sentry_sdk.get_global_scope(), sentry_sdk.get_isolation_scope(), sentry_sdk.get_current_scope()):
            scope.clear()


def assert_nothing_sensitive(raw: bytes, *also: str) -> None:
    text = raw.decode("utf-8", "replace")
    for secret in (
        *TRANSCRIPT.split(" morning ")[:1],
        "Marguerite",
        SESSION_ID,
        AUDIO_ID,
        BEARER,
        XI_KEY,
        COOKIE,
        GROQ_KEY,
        ELEVEN_KEY,
        "Bearer",
        *also,
    ):
        assert secret not in text, f"{secret!r} reached Sentry"


def hex_ids(raw: bytes) -> set[str]:
    return set(re.findall(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])", raw.decode("utf-8", "replace")))


def sentry_ids(envelope: Envelope) -> set[str]:
    """The 32-hex ids Sentry itself makes: event ids and trace ids."""
    ids = {str(envelope.header.get("event_id")), str(envelope.header.get("trace", {}).get("trace_id"))}
    for event in envelope.events():
        ids.add(str(event.get("event_id")))
        ids.add(str(event.get("contexts", {}).get("trace", {}).get("trace_id")))
    return ids


# -- the app -------------------------------------------------------------------------------------


def test_an_unhandled_error_in_a_turn_reaches_sentry_once_and_scrubbed(
    sims: Simulators, tmp_path: Path, sentry: RunningSentry
) -> None:
    settings = app_settings(sims, tmp_path / "data", sentry_dsn=sentry.dsn, feature_memory=False)
    with running_app(settings) as app, ApiClient(app.url) as client:
        session_id = client.create_session()
        # Gone from under the app: the turn's reply audio cannot be written, and nothing expects that.
        shutil.rmtree(settings.data_dir / "audio")
        response = client.http.post(
            f"{API}/sessions/{session_id}/turns",
            json={"text": TRANSCRIPT},
            headers={
                "authorization": f"Bearer {BEARER}",
                "xi-api-key": XI_KEY,
                "cookie": COOKIE,
                "x-session-id": session_id,
            },
        )
        assert response.status_code == 500, response.text
        assert response.json()["error"]["code"] == "internal_error"
        request_id = response.headers["x-request-id"]
        sentry_sdk.flush(timeout=10)
        assert wait_until(lambda: bool(sentry.recorder.events()), 10), sentry.recorder.paths

    events = sentry.recorder.events()
    assert len(events) == 1, [event.get("exception") for event in events]
    event = events[0]
    assert event["environment"] == "development"
    assert event["release"] == default_release() == "voice-companion@0.1.0"
    assert event["server_name"] == "app"
    # The exception: its type and where, not its message (which names the audio file).
    (exception,) = event["exception"]["values"]
    assert exception["type"] == "FileNotFoundError"
    assert exception["value"] == FILTERED
    assert exception["mechanism"]["handled"] is False
    frames = exception["stacktrace"]["frames"]
    assert any(frame.get("function") == "save" for frame in frames)
    assert not any("vars" in frame for frame in frames)
    # The route, not the path; the path with the id redacted; no body, cookies or keys.
    assert event["transaction"] == "/api/v1/sessions/{session_id}/turns"
    assert event["request"]["url"].endswith("/api/v1/sessions/[redacted]/turns")
    assert event["request"]["method"] == "POST"
    assert set(event["request"]["headers"]) <= {"accept", "content-length", "content-type", "host"}
    assert "data" not in event["request"]
    assert "cookies" not in event["request"]
    assert "user" not in event
    assert event["tags"]["request_id"] == request_id
    # Breadcrumbs: the calls to the providers, and nothing else (no log lines).
    crumbs = event.get("breadcrumbs", {}).get("values", [])
    assert crumbs, "no breadcrumbs of the calls to the providers"
    assert {crumb["category"] for crumb in crumbs} == {"httplib"}, crumbs
    assert any("/openai/v1/chat/completions" in crumb["data"]["url"] for crumb in crumbs)

    raw = sentry.recorder.raw()
    assert_nothing_sensitive(raw, session_id, "two cups", "every morning")
    (envelope,) = [envelope for envelope in sentry.recorder.envelopes if envelope.events()]
    assert hex_ids(raw) <= sentry_ids(envelope), "an audio id (32 hex digits) reached Sentry"


def test_python_m_app_reports_an_unhandled_error_once(sims: Simulators, tmp_path: Path, sentry: RunningSentry) -> None:
    """The process as deployed: its log handler (which redacts and takes the traceback off
    the record) and the event handler placed before it do not add a second event."""
    port = new_port()
    data_dir = tmp_path / "data"
    env = app_environment(
        sims, data_dir, port, SENTRY_DSN=sentry.dsn, SENTRY_RELEASE="companion-test-1", APP_FEATURE_MEMORY="false"
    )
    with app_process(tmp_path / "logs", env) as process, ApiClient(process.url) as client:
        session_id = client.create_session()
        shutil.rmtree(data_dir / "audio")
        response = client.text_turn(session_id, TRANSCRIPT)
        assert response.status_code == 500, response.text
        assert process.stop() == 0  # the SDK sends what it holds before the process ends
        assert "unhandled error" in process.stdout()

    events = sentry.recorder.events()
    assert len(events) == 1, [(event.get("logentry"), event.get("exception")) for event in events]
    (event,) = events
    assert (event["environment"], event["release"], event["server_name"]) == ("development", "companion-test-1", "app")
    assert event["exception"]["values"][-1]["type"] == "FileNotFoundError"
    assert event["transaction"] == "/api/v1/sessions/{session_id}/turns"
    assert_nothing_sensitive(sentry.recorder.raw(), session_id, "two cups")


def test_python_m_app_reports_its_logged_errors(tmp_path: Path, sentry: RunningSentry) -> None:
    """Lines logged at ERROR reach Sentry from `python -m app` (through the handler it puts
    before its own; the app's client sends none by itself), the database unreachable at
    start-up here; the traceback uvicorn logs as a message is cut to its first line."""
    port = new_port()
    env = {
        "APP_HOST": "127.0.0.1",
        "APP_PORT": str(port),
        "APP_DATA_DIR": str(tmp_path / "data"),
        "APP_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{closed_port()}/nowhere",
        "SENTRY_DSN": sentry.dsn,
    }
    result = subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=PROJECT_ROOT,
        env={**_clean_environment(), **env},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert b"cannot be reached" in result.stdout, result.stdout + result.stderr
    events = sentry.recorder.events()
    logged = {(event.get("logger"), event["logentry"]["message"]) for event in events if "logentry" in event}
    assert logged == {
        ("app.storage", "the database at APP_DATABASE_URL cannot be reached"),
        ("uvicorn.error", "Traceback (most recent call last):"),
        ("uvicorn.error", "Application startup failed. Exiting."),
    }, logged
    # The start-up failure itself, once: from the Starlette integration (the lifespan raised).
    (failure,) = [event for event in events if event.get("exception")]
    assert failure["exception"]["values"][-1]["type"] == "PoolTimeout"
    assert failure["exception"]["values"][-1]["value"] == FILTERED  # its message, which says the timeout


def _clean_environment() -> dict[str, str]:
    import os

    prefixes = ("EDGE_", "APP_", "SIM_", "OTEL_", "GROQ_", "ELEVENLABS_", "SENTRY_")
    return {name: value for name, value in os.environ.items() if not name.startswith(prefixes)}


# -- the edge ------------------------------------------------------------------------------------


def test_an_error_in_the_edge_reaches_sentry_scrubbed(sentry: RunningSentry) -> None:
    # A label longer than DNS allows: the resolver raises UnicodeError, which the proxy
    # does not expect; it logs the failure and answers 500.
    upstream = f"http://{'a' * 64}.test:{closed_port()}"
    with running_edge(upstream, sentry_dsn=SecretStr(sentry.dsn), environment="staging") as edge:
        response = httpx.get(
            f"{edge.url}/api/v1/sessions/{SESSION_ID}?token={BEARER}",
            headers={"authorization": f"Bearer {BEARER}", "cookie": COOKIE, "xi-api-key": XI_KEY},
            trust_env=False,
        )
        assert response.status_code == 500, response.text
        request_id = response.headers["x-request-id"]
        sentry_sdk.flush(timeout=10)
        assert wait_until(lambda: bool(sentry.recorder.events()), 10), sentry.recorder.paths

    # The request's own event (the same failure may come again from the edge's readiness
    # checks, with no request).
    events = [event for event in sentry.recorder.events() if event.get("tags", {}).get("request_id") == request_id]
    assert len(events) == 1, [(event.get("logger"), event.get("logentry")) for event in sentry.recorder.events()]
    (event,) = events
    assert (event["environment"], event["server_name"]) == ("staging", "edge")
    assert event["release"] == default_release()
    assert event["logger"] == "edge.proxy"
    assert event["logentry"]["message"] == "proxy failure before the response started"
    assert event["exception"]["values"][-1]["type"] == "UnicodeError"
    assert all(value["value"] == FILTERED for value in event["exception"]["values"] if value.get("value"))
    crumbs = event.get("breadcrumbs", {}).get("values", [])
    assert all(crumb["category"] == "httplib" for crumb in crumbs), "the edge's log lines must not become breadcrumbs"
    assert_nothing_sensitive(sentry.recorder.raw())


def test_error_tracking_is_off_and_not_even_imported_without_a_dsn() -> None:
    script = (
        "import sys\n"
        "from edge.app import create_app\n"
        "from app.main import create_app as create_internal_app\n"
        "from app.settings import AppSettings\n"
        "from app.outbound import OutboundSettings\n"
        "create_app(); create_internal_app(AppSettings(), OutboundSettings())\n"
        "print('sentry_sdk' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=PROJECT_ROOT,
        env={**_clean_environment(), "SENTRY_DSN": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == "False", result.stderr


# -- settings ------------------------------------------------------------------------------------


def test_a_malformed_dsn_stops_the_start_up_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENTRY_DSN", "https://sentry.example.com/12")  # no public key
    with pytest.raises(ConfigurationError) as refused:
        load(EdgeSettings)
    message = str(refused.value)
    assert "SENTRY_DSN: not a Sentry DSN" in message
    assert "sentry.example.com" not in message  # the value is not repeated
    monkeypatch.setenv("SENTRY_DSN", "")
    monkeypatch.setenv("SENTRY_RELEASE", "feature/branch")
    with pytest.raises(ConfigurationError, match="SENTRY_RELEASE"):
        load(EdgeSettings)
    monkeypatch.delenv("SENTRY_RELEASE")
    assert dsn_of(load(EdgeSettings)) is None  # empty is off


# -- the scrubber ----------------------------------------------------------------------------------


def crafted_event() -> dict[str, Any]:
    """An event with something sensitive in every place one could hide."""
    path = f"/api/v1/sessions/{SESSION_ID}/turns"
    return {
        "message": f"turn failed for {SESSION_ID}",
        "logentry": {"message": "turn %s said %r", "params": [SESSION_ID, TRANSCRIPT], "formatted": TRANSCRIPT},
        "exception": {
            "values": [
                {
                    "type": "ValidationError",
                    "value": f"input_value='{TRANSCRIPT}' for session {SESSION_ID}",
                    "stacktrace": {
                        "frames": [
                            {"function": "turn", "vars": {"text": TRANSCRIPT, "key": BEARER}, "context_line": "x = 1"}
                        ]
                    },
                }
            ]
        },
        "threads": {"values": [{"stacktrace": {"frames": [{"function": "run", "vars": {"reply": TRANSCRIPT}}]}}]},
        "request": {
            "method": "POST",
            "url": f"http://app.internal{path}?audio={AUDIO_ID}",
            "query_string": f"audio={AUDIO_ID}&token={BEARER}",
            "headers": {
                "Authorization": f"Bearer {BEARER}",
                "xi-api-key": XI_KEY,
                "Cookie": COOKIE,
                "Content-Type": "application/json",
                "X-Session": SESSION_ID,
                "User-Agent": "Mozilla/5.0",
            },
            "cookies": {"companion_session": COOKIE},
            "data": {"text": TRANSCRIPT},
            "env": {"REMOTE_ADDR": "203.0.113.7"},
        },
        "user": {"ip_address": "203.0.113.7", "id": SESSION_ID},
        "extra": {
            "transcript": TRANSCRIPT,
            "detail": {"reply": TRANSCRIPT, "note": f"audio {AUDIO_ID}"},
            "groq_api_key": GROQ_KEY,
            "exception": f"Traceback ... {TRANSCRIPT}",
            "sessions_deleted": 3,
        },
        "contexts": {
            "trace": {"trace_id": "a" * 32, "span_id": "b" * 16, "description": path},
            "turn": {"session_id": SESSION_ID, "said": TRANSCRIPT, "step": f"speak {AUDIO_ID}"},
        },
        "tags": {"session": SESSION_ID, "route": path, "elevenlabs_api_key": ELEVEN_KEY},
        "transaction": path,
        "breadcrumbs": {
            "values": [
                {"type": "log", "category": "app.api", "message": f"said {TRANSCRIPT}"},
                {"type": "redis", "category": "redis", "message": f"GET edge:{SESSION_ID}"},
                {"type": "default", "category": "query", "message": "INSERT ...", "data": {"params": [TRANSCRIPT]}},
                {
                    "type": "http",
                    "category": "httplib",
                    "data": {
                        "url": f"http://qdrant:6333/collections/memories-{SESSION_ID}/points",
                        "http.method": "PUT",
                        "http.query": f"key={BEARER}",
                        "http.response.status_code": 200,
                        "headers": {"xi-api-key": XI_KEY},
                    },
                },
            ]
        },
    }


def test_the_scrubber_leaves_nothing_sensitive_in_an_event() -> None:
    event = scrub_event(crafted_event(), {})  # type: ignore[arg-type]
    assert event is not None
    data: dict[str, Any] = dict(event)
    assert_nothing_sensitive(json.dumps(data).encode(), "203.0.113.7", "Mozilla")
    assert "user" not in data
    assert data["request"] == {
        "method": "POST",
        "url": "http://app.internal/api/v1/sessions/[redacted]/turns",
        "headers": {"Content-Type": "application/json"},
    }
    assert data["exception"]["values"][0]["value"] == FILTERED
    assert data["exception"]["values"][0]["stacktrace"]["frames"] == [{"function": "turn", "context_line": "x = 1"}]
    assert data["logentry"] == {"message": "turn %s said %r", "formatted": "turn %s said %r"}
    assert data["message"] == "turn failed for [redacted]"
    assert data["transaction"] == "/api/v1/sessions/[redacted]/turns"
    assert data["extra"]["sessions_deleted"] == 3
    assert data["extra"]["transcript"] == FILTERED
    assert data["contexts"]["trace"]["trace_id"] == "a" * 32  # Sentry's own id, kept
    assert data["contexts"]["turn"]["session_id"] == FILTERED
    (crumb,) = data["breadcrumbs"]["values"]
    assert crumb["data"] == {
        "url": "http://qdrant:6333/collections/[redacted]/points",
        "http.method": "PUT",
        "http.response.status_code": 200,
    }


def test_breadcrumbs_other_than_outgoing_http_are_dropped() -> None:
    assert scrub_breadcrumb({"type": "log", "category": "app.api", "message": TRANSCRIPT}, {}) is None
    assert scrub_breadcrumb({"type": "redis", "category": "redis", "message": "GET x"}, {}) is None
    kept = scrub_breadcrumb(
        {"type": "http", "category": "httplib", "data": {"url": f"http://sim/v1/x/{AUDIO_ID}?k={BEARER}"}}, {}
    )
    assert kept == {"type": "http", "category": "httplib", "data": {"url": "http://sim/v1/x/[redacted]"}}


@dataclass(frozen=True)
class TrackingSettings:
    sentry_dsn: SecretStr | None
    sentry_release: str | None = None
    environment: Environment = Environment.production


def test_a_crafted_event_through_the_sdk_arrives_scrubbed(sentry: RunningSentry) -> None:
    """The SDK's own scrubber and `before_send` together, on the wire."""
    assert init_error_tracking(TrackingSettings(SecretStr(sentry.dsn), "companion-2"), "edge")
    sentry_sdk.capture_event(crafted_event())  # type: ignore[arg-type]
    sentry_sdk.flush(timeout=10)
    assert wait_until(lambda: bool(sentry.recorder.events()), 10), sentry.recorder.paths
    (event,) = sentry.recorder.events()
    assert (event["environment"], event["release"], event["server_name"]) == ("production", "companion-2", "edge")
    assert_nothing_sensitive(sentry.recorder.raw(), "203.0.113.7")


def test_without_a_dsn_nothing_is_initialised(sentry: RunningSentry) -> None:
    assert not init_error_tracking(TrackingSettings(None), "edge")
    assert not init_error_tracking(TrackingSettings(SecretStr("  ")), "edge")
    assert not sentry_sdk.get_client().is_active()
