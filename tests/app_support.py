"""The internal app for end-to-end tests: two provider simulators, the app (in a thread, or
as `python -m app` in a process of its own), the edge in front of it, and a small typed
client of the app's API.

Everything runs on loopback over real HTTP: the edge forwards to the app, the app calls the
simulators through its resilient outbound transport. Two simulators: one stands in for Groq
(chat, transcription), the other for ElevenLabs (speech), so that each counts its own
provider's calls and takes its faults. (Breakers are per provider either way:
tests/test_app_resilience.py runs both providers on one simulator, as `make run` does.)
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sqlite3
from collections.abc import Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict, TypeVar, cast

import httpx
import psycopg
from fastapi import FastAPI
from psycopg import sql

from app.companion import Companion
from app.main import create_app
from app.outbound import HostPolicy, OutboundSettings
from app.settings import AppSettings
from edge.policy import Policy, load_policy
from tests.processes import PROJECT_ROOT, ServiceProcess, running_process, start_process
from tests.servers import RunningEdge, ServerThread, closed_port, serve, start_edge
from tests.sim_support import ELEVEN_KEY, GROQ_KEY, start_sim

API = "/api/v1"
MIB = 1024 * 1024
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"

T = TypeVar("T")
Route = Literal["chat", "transcribe", "speech"]


# -- the simulators ------------------------------------------------------------------------------------------


@dataclass
class Simulators:
    """One simulator for Groq, one for ElevenLabs (the same one twice, for `make run`'s set-up)."""

    groq: ServerThread
    elevenlabs: ServerThread

    @property
    def groq_base_url(self) -> str:
        return f"{self.groq.url}/openai/v1"

    @property
    def elevenlabs_base_url(self) -> str:
        return self.elevenlabs.url

    def server_for(self, route: Route) -> ServerThread:
        return self.elevenlabs if route == "speech" else self.groq

    def fault(self, route: Route, status: int = 503, *, times: int = -1, delay_ms: int = 0) -> None:
        """Queues a fault on the simulator that serves `route`."""
        response = httpx.post(
            f"{self.server_for(route).url}/_sim/faults",
            json={"route": route, "status": status, "times": times, "delay_ms": delay_ms},
            trust_env=False,
        )
        assert response.status_code == 201, response.text

    def clear_faults(self) -> None:
        for server in (self.groq, self.elevenlabs):
            httpx.delete(f"{server.url}/_sim/faults", trust_env=False).raise_for_status()

    def reset(self) -> None:
        """Faults, counts, latency and Groq's budgets back to the start, on both."""
        for server in (self.groq, self.elevenlabs):
            httpx.post(f"{server.url}/_sim/reset", trust_env=False).raise_for_status()

    def calls(self) -> dict[Route, int]:
        """Calls received per route, each counted on the simulator that serves it."""
        counts: dict[Route, int] = {}
        for route in ("chat", "transcribe", "speech"):
            stats = httpx.get(f"{self.server_for(route).url}/_sim/calls", trust_env=False).json()
            counts[route] = int(stats[route]["received"])
        return counts

    def statuses(self, route: Route) -> dict[str, int]:
        stats = httpx.get(f"{self.server_for(route).url}/_sim/calls", trust_env=False).json()
        return cast(dict[str, int], stats[route]["statuses"])

    def context(self, said: str) -> tuple[int, int]:
        """(messages, memories) the latest reply to `said` was given, as the simulator
        recorded it (`GET /_sim/chats`): what the app put in the prompt."""
        chats = httpx.get(f"{self.groq.url}/_sim/chats", trust_env=False).json()["chats"]
        for chat in reversed(chats):
            if chat["kind"] == "reply" and chat["said"] == said:
                return int(chat["messages"]), int(chat["memories"])
        raise AssertionError(f"no reply to {said!r} among {chats}")

    def stop(self) -> None:
        self.groq.stop()
        self.elevenlabs.stop()


def start_simulators() -> Simulators:
    return Simulators(groq=start_sim(), elevenlabs=start_sim())


# -- the app's configuration ---------------------------------------------------------------------------------


def fast_policy(**overrides: Any) -> HostPolicy:
    """No retries, short timeouts, a breaker that re-closes within a second: fault tests
    stay fast and one test's failures do not leave the next test in front of an open breaker."""
    values: dict[str, Any] = {
        "attempt_timeout": 10.0,
        "total_deadline": 20.0,
        "connect_timeout": 1.0,
        "window_seconds": 20.0,
        "open_seconds": 1.0,
        "max_retries": 0,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
        **overrides,
    }
    return HostPolicy(**values)


def fast_outbound() -> OutboundSettings:
    return OutboundSettings(
        groq=fast_policy(),
        elevenlabs=fast_policy(max_concurrency=3),
        qdrant=fast_policy(attempt_timeout=1.0, total_deadline=2.0, connect_timeout=0.5, all_methods_idempotent=True),
    )


# The same, for `python -m app`, as its environment says it.
FAST_OUTBOUND_ENV = {
    f"APP_OUTBOUND_{provider}__{field}": value
    for provider in ("GROQ", "ELEVENLABS")
    for field, value in {
        "MAX_RETRIES": "0",
        "OPEN_SECONDS": "1",
        "BACKOFF_BASE": "0.01",
        "BACKOFF_MAX": "0.05",
    }.items()
}


def app_settings(sims: Simulators, data_dir: Path, **overrides: Any) -> AppSettings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "groq_base_url": sims.groq_base_url,
        "groq_api_key": GROQ_KEY,
        "elevenlabs_base_url": sims.elevenlabs_base_url,
        "elevenlabs_api_key": ELEVEN_KEY,
        "log_level": "warning",
        **overrides,
    }
    return AppSettings(**values)


def app_environment(sims: Simulators, data_dir: Path, port: int, **overrides: str) -> dict[str, str]:
    """The environment of `python -m app` pointed at the simulators."""
    return {
        "APP_HOST": "127.0.0.1",
        "APP_PORT": str(port),
        "APP_DATA_DIR": str(data_dir),
        "APP_LOG_LEVEL": "info",
        "APP_DRAIN_TIMEOUT": "5",
        "GROQ_BASE_URL": sims.groq_base_url,
        "GROQ_API_KEY": GROQ_KEY,
        "ELEVENLABS_BASE_URL": sims.elevenlabs_base_url,
        "ELEVENLABS_API_KEY": ELEVEN_KEY,
        **FAST_OUTBOUND_ENV,
        **overrides,
    }


# -- the app in a thread -------------------------------------------------------------------------------------


@dataclass
class AppThread:
    """The app served by uvicorn on a loopback thread, its lifespan run as in production."""

    app: FastAPI
    server: ServerThread
    settings: AppSettings

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def companion(self) -> Companion:
        companion: Companion = self.app.state.companion
        return companion

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Runs `coroutine` on the app's own event loop (its stores belong to that loop)."""
        assert self.server.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.server.loop).result(timeout)

    def memory_count(self, session_id: str) -> int:
        """The memories the session can recall: every one, the search ranking them all."""
        memory = self.companion.services.memory
        assert memory is not None, "long-term memory is off"
        self.run(self.companion.settled())  # the last turn's memory is written after its answer
        return len(self.run(memory.recall(session_id, "anything at all", 1000)))

    def stop(self) -> None:
        self.server.stop()


def start_app(settings: AppSettings, outbound: OutboundSettings | None = None) -> AppThread:
    app = create_app(settings, outbound or fast_outbound())
    server = serve(app, lifespan="on", timeout_graceful_shutdown=5)
    return AppThread(app, server, settings)


@contextmanager
def running_app(settings: AppSettings, outbound: OutboundSettings | None = None) -> Iterator[AppThread]:
    started = start_app(settings, outbound)
    try:
        yield started
    finally:
        started.stop()


# -- the app as a process ------------------------------------------------------------------------------------


def start_app_process(log_dir: Path, env: Mapping[str, str]) -> ServiceProcess:
    """Starts `python -m app`; `env` must say APP_PORT (where to reach it)."""
    return start_process("app", log_dir, int(env["APP_PORT"]), env)


def app_process(log_dir: Path, env: Mapping[str, str]) -> contextlib.AbstractContextManager[ServiceProcess]:
    """A started, healthy app process; killed if still running when left."""
    return running_process("app", log_dir, int(env["APP_PORT"]), env, f"{API}/health")


def new_port() -> int:
    """A loopback port free right now, for a process to listen on."""
    return closed_port()


# -- SQLite --------------------------------------------------------------------------------------------------


def sqlite_integrity(database: Path) -> str:
    """SQLite's check of every page and index ("ok" when sound), from a connection of the
    test's own: opening the file recovers what a killed process left in the write-ahead
    log, as the app's own start does."""
    connection = sqlite3.connect(database)
    try:
        rows = connection.execute("PRAGMA integrity_check").fetchall()
    finally:
        connection.close()
    return "\n".join(str(row[0]) for row in rows)


# -- PostgreSQL ----------------------------------------------------------------------------------------------


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A fresh, empty schema in the test database, dropped afterwards: a database of its own
    for the app, without touching anything else in the shared server."""
    name = f"e2e_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


def schema_url(schema: str) -> str:
    """The test database, with `schema` first on the search path: where the app's tables go."""
    return f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"


# -- the edge in front ---------------------------------------------------------------------------------------


SHIPPED_POLICY = PROJECT_ROOT / "config" / "edge-policy.toml"


def unlimited_shipped_policy() -> Policy:
    """The shipped policy file without its rate limits: these tests take more turns than a
    person would; its body limits and redaction stay."""
    shipped = load_policy(SHIPPED_POLICY)
    return Policy(routes=[rule.model_copy(update={"rate_limit": None}) for rule in shipped.routes])


def start_app_edge(app_url: str) -> RunningEdge:
    """The edge as deployed in front of the app - the default 1 MiB body limit, the shipped
    policy's larger one for turns (voice uploads) - with rate limiting off."""
    return start_edge(app_url, unlimited_shipped_policy(), rate_limit_default="off", max_body_bytes=MIB)


# -- a typed client of the API -------------------------------------------------------------------------------


class ErrorDetail(TypedDict):
    code: str
    message: str
    request_id: str | None
    details: NotRequired[list[dict[str, str]]]


class ErrorBody(TypedDict):
    error: ErrorDetail


class SessionCreated(TypedDict):
    session_id: str
    created_at: str


class MessageBody(TypedDict):
    role: Literal["user", "assistant"]
    text: str
    at: str
    audio_url: str | None


class SessionBody(TypedDict):
    session_id: str
    created_at: str
    updated_at: str
    messages: list[MessageBody]


class TurnBody(TypedDict):
    turn_id: str
    transcript: str
    reply: str
    audio_url: str | None
    degraded: list[str]
    timings_ms: dict[str, float]


class ApiClient:
    """The app's API as a browser would call it (through the edge, in these tests)."""

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        self.http = httpx.Client(base_url=base_url, trust_env=False, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # raw calls: the response as it came

    def post_session(self) -> httpx.Response:
        return self.http.post(f"{API}/sessions")

    def get_session(self, session_id: str) -> httpx.Response:
        return self.http.get(f"{API}/sessions/{session_id}")

    def delete_session(self, session_id: str) -> httpx.Response:
        return self.http.delete(f"{API}/sessions/{session_id}")

    def text_turn(self, session_id: str, text: str) -> httpx.Response:
        return self.http.post(f"{API}/sessions/{session_id}/turns", json={"text": text})

    def voice_turn(
        self, session_id: str, audio: bytes, filename: str = "clip.mp3", content_type: str = "audio/mpeg"
    ) -> httpx.Response:
        return self.http.post(f"{API}/sessions/{session_id}/turns", files={"audio": (filename, audio, content_type)})

    def raw_turn(self, session_id: str, body: bytes, content_type: str) -> httpx.Response:
        return self.http.post(
            f"{API}/sessions/{session_id}/turns", content=body, headers={"content-type": content_type}
        )

    def get(self, path: str) -> httpx.Response:
        return self.http.get(path)

    # checked calls: the body, typed, after the status was what it must be

    def create_session(self) -> str:
        response = self.post_session()
        assert response.status_code == 201, response.text
        return cast(SessionCreated, response.json())["session_id"]

    def session(self, session_id: str) -> SessionBody:
        response = self.get_session(session_id)
        assert response.status_code == 200, response.text
        return cast(SessionBody, response.json())

    def say(self, session_id: str, text: str) -> TurnBody:
        response = self.text_turn(session_id, text)
        assert response.status_code == 200, response.text
        return cast(TurnBody, response.json())


def error_of(response: httpx.Response) -> ErrorDetail:
    """The envelope's `error`, after checking the envelope's shape and request id."""
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = cast(ErrorBody, body)["error"]
    assert {"code", "message", "request_id"} <= set(error), error
    assert set(error) <= {"code", "message", "request_id", "details"}, error
    assert isinstance(error["code"], str)
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["request_id"] == response.headers["x-request-id"], (error, response.headers)
    return error
