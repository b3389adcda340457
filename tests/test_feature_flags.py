"""The feature flags, through the real app (docs/app.md#feature-flags).

Each flag is read once at start-up, shown in `/ready`'s `features`, and honoured: memory
off opens no Qdrant client - neither the embedded store (no files) nor a server (here a
listening socket, which would see any connection) - and skips recall and remember without
calling it a degradation; speech off synthesises nothing; summaries off never summarise
and keep the model's context to the latest messages; documentation off answers 404 for
the document and its viewer. The simulator records what the model was given
(`GET /_sim/chats`: N messages, M memories), and its call counts show what reached the
providers.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.api.docs import build_docs
from app.settings import AppSettings
from common.settings import Environment
from tests.app_support import (
    API,
    ApiClient,
    Simulators,
    app_environment,
    app_process,
    app_settings,
    error_of,
    new_port,
    running_app,
)
from tests.servers import free_socket

DOCUMENTATION = (f"{API}/openapi.json", f"{API}/docs")
# Where FastAPI would put them by default, and the viewer the app never serves.
NEVER_SERVED = (f"{API}/redoc", "/openapi.json", "/docs", "/redoc")


@pytest.fixture(autouse=True)
def fresh_sims(sims: Simulators) -> None:
    sims.reset()


@pytest.fixture
def qdrant_socket() -> Iterator[socket.socket]:
    """Where a Qdrant server would be: listening, never answering; a connection waits in
    its backlog to be seen."""
    listener = free_socket()
    listener.listen(16)
    listener.setblocking(False)
    yield listener
    listener.close()


def assert_never_connected(listener: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        listener.accept()


# -- the settings ------------------------------------------------------------------------------


def test_every_feature_is_on_by_default_and_the_documentation_only_in_development() -> None:
    for environment in Environment:
        settings = AppSettings(environment=environment, groq_api_key="k", elevenlabs_api_key="k")
        assert (settings.feature_memory, settings.feature_speech, settings.feature_summaries) == (True, True, True)
        assert settings.feature_api_docs is (environment is Environment.development), environment


def test_flags_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENVIRONMENT", "staging")
    monkeypatch.setenv("APP_FEATURE_MEMORY", "false")
    monkeypatch.setenv("APP_FEATURE_SPEECH", "0")
    monkeypatch.setenv("APP_FEATURE_SUMMARIES", "off")
    monkeypatch.setenv("APP_FEATURE_API_DOCS", "true")
    settings = AppSettings()
    flags = (settings.feature_memory, settings.feature_speech, settings.feature_summaries, settings.feature_api_docs)
    assert flags == (False, False, False, True)


@pytest.mark.parametrize(
    ("values", "published"),
    [
        ({"APP_DOCS_ENABLED": "true"}, True),
        ({"APP_DOCS_ENABLED": "false", "ENVIRONMENT": "development"}, False),
        ({"APP_DOCS_ENABLED": "true", "APP_FEATURE_API_DOCS": "false"}, False),
        ({"APP_DOCS_ENABLED": "false", "APP_FEATURE_API_DOCS": "true"}, True),
    ],
)
def test_the_documentation_flag_has_another_name_which_its_own_name_overrides(
    monkeypatch: pytest.MonkeyPatch, values: dict[str, str], published: bool
) -> None:
    monkeypatch.setenv("ENVIRONMENT", "staging")
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    assert AppSettings().feature_api_docs is published


# -- memory ------------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["embedded", "server"])
def test_memory_off_opens_no_store_and_is_no_degradation(
    sims: Simulators, tmp_path: Path, qdrant_socket: socket.socket, store: str
) -> None:
    data = tmp_path / "data"
    qdrant_url = f"http://127.0.0.1:{qdrant_socket.getsockname()[1]}" if store == "server" else None
    settings = app_settings(sims, data, feature_memory=False, qdrant_url=qdrant_url)
    with running_app(settings) as app, ApiClient(app.url) as api:
        session_id = api.create_session()
        told = api.say(session_id, "My dog is called Max.")
        asked = api.say(session_id, "What is my dog called?")
        for turn in (told, asked):
            assert turn["degraded"] == [], turn
            assert not {"recall", "remember"} & set(turn["timings_ms"]), turn["timings_ms"]
            assert turn["audio_url"] is not None
        assert sims.context(asked["transcript"]) == (2, 0)
        assert sims.calls()["chat"] == 2, "only the replies: no memory decision was asked for"

        ready = api.get(f"{API}/ready")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["checks"] == {"database": "up"}
        assert set(body["breakers"]) == {"groq", "elevenlabs"}
        assert body["features"] == {"memory": False, "speech": True, "summaries": True, "api_docs": True}

        assert api.delete_session(session_id).status_code == 204
        assert api.get_session(session_id).status_code == 404
    assert_never_connected(qdrant_socket)
    assert not (data / "qdrant").exists(), "the embedded store was opened"


# -- speech ------------------------------------------------------------------------------------


def test_speech_off_synthesises_nothing_and_is_no_degradation(sims: Simulators, tmp_path: Path) -> None:
    with running_app(app_settings(sims, tmp_path / "data", feature_speech=False)) as app, ApiClient(app.url) as api:
        session_id = api.create_session()
        turn = api.say(session_id, "Good morning!")
        assert turn["audio_url"] is None
        assert turn["degraded"] == []
        assert "speak" not in turn["timings_ms"]
        assert turn["reply"] == "Hello, I'm Rose. How are you today?"
        messages = api.session(session_id)["messages"]
        assert [message["audio_url"] for message in messages] == [None, None]
        assert api.get(f"{API}/ready").json()["features"]["speech"] is False
    assert sims.calls()["speech"] == 0


# -- summaries ---------------------------------------------------------------------------------


def test_summaries_off_never_summarise_and_bound_the_context(sims: Simulators, tmp_path: Path) -> None:
    settings = app_settings(
        sims, tmp_path / "data", feature_summaries=False, summarise_after_messages=6, keep_recent_messages=2
    )
    with running_app(settings) as app, ApiClient(app.url) as api:
        session_id = api.create_session()
        contexts = [sims.context(api.say(session_id, f"Message number {turn}.")["transcript"])[0] for turn in range(6)]
        # The model sees the latest 6 messages at most: the 5 before the newest, and it.
        assert contexts == [0, 2, 4, 5, 5, 5]
        conversation = app.run(app.companion.session(session_id))
        assert (conversation.get("summary", ""), conversation.get("summarised", 0)) == ("", 0)
        assert len(conversation["messages"]) == 12
        assert api.get(f"{API}/ready").json()["features"]["summaries"] is False
    # Per turn a reply and a memory decision; a summary would be one more.
    assert sims.calls()["chat"] == 12


# -- the API's documentation -------------------------------------------------------------------


def test_the_documentation_is_served_in_development_and_not_elsewhere(sims: Simulators, tmp_path: Path) -> None:
    with running_app(app_settings(sims, tmp_path / "development")) as app, ApiClient(app.url) as api:
        document = api.get(f"{API}/openapi.json")
        assert document.status_code == 200, document.text
        assert document.json()["openapi"].startswith("3.")
        viewer = api.get(f"{API}/docs")
        assert viewer.status_code == 200
        for name in build_docs().assets:
            assert f"/assets/{name}" in viewer.text
        for path in NEVER_SERVED:
            assert error_of(api.get(path))["code"] == "not_found", path
        assert api.get(f"{API}/ready").json()["features"]["api_docs"] is True

    staging = app_settings(sims, tmp_path / "staging", environment="staging")
    swagger_ui = [f"/assets/{name}" for name in build_docs().assets]
    with running_app(staging) as app, ApiClient(app.url) as api:
        for path in (*DOCUMENTATION, *NEVER_SERVED, *swagger_ui):
            hidden = api.get(path)
            assert hidden.status_code == 404, (path, hidden.text)
            assert error_of(hidden)["code"] == "not_found"
        body = api.get(f"{API}/ready").json()
        assert body["features"] == {"memory": True, "speech": True, "summaries": True, "api_docs": False}


# -- every flag off, in `python -m app` --------------------------------------------------------


def test_the_app_process_with_every_feature_off_needs_no_qdrant(
    sims: Simulators, tmp_path: Path, qdrant_socket: socket.socket
) -> None:
    env = app_environment(
        sims,
        tmp_path / "data",
        new_port(),
        APP_FEATURE_MEMORY="false",
        APP_FEATURE_SPEECH="false",
        APP_FEATURE_SUMMARIES="false",
        APP_FEATURE_API_DOCS="false",
        APP_QDRANT_URL=f"http://127.0.0.1:{qdrant_socket.getsockname()[1]}",
    )
    with app_process(tmp_path / "logs", env) as app, ApiClient(app.url) as api:
        ready = api.get(f"{API}/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"database": "up"}
        assert ready.json()["features"] == {"memory": False, "speech": False, "summaries": False, "api_docs": False}
        session_id = api.create_session()
        turn = api.say(session_id, "Hello there.")
        assert (turn["degraded"], turn["audio_url"]) == ([], None)
        assert api.get(f"{API}/openapi.json").status_code == 404
    assert_never_connected(qdrant_socket)
    assert sims.calls() == {"chat": 1, "transcribe": 0, "speech": 0}
