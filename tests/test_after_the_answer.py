"""The work after a turn's answer (app/companion.py, docs/app.md#a-turn): the memory
extraction and the summary run once the turn is answered, still holding the session, so
the next turn waits for them and sees what they did; a failure there is skipped; a
graceful shutdown finishes them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.app_support import (
    ApiClient,
    AppThread,
    Simulators,
    app_environment,
    app_process,
    app_settings,
    new_port,
    start_app,
)

SLOW_EXTRACTION_MS = 1500
FACT = "My dog is called Max"

pytestmark = pytest.mark.usefixtures("fresh_sims")


@pytest.fixture(scope="module")
def app(sims: Simulators, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppThread]:
    started = start_app(app_settings(sims, tmp_path_factory.mktemp("after-the-answer")))
    yield started
    started.stop()


def slow_extraction(sims: Simulators, *, status: int = 200) -> None:
    """The turn's reply answers at once; the memory extraction after it (the next chat call)
    is slow, or fails."""
    sims.fault("chat", 200, times=1)
    sims.fault("chat", status, times=1, delay_ms=SLOW_EXTRACTION_MS)


def stored_now(app: AppThread, session_id: str) -> int:
    """The session's memories as they are right now, not waiting for anything."""
    memory = app.companion.services.memory
    assert memory is not None
    return len(app.run(memory.recall(session_id, "anything at all", 100)))


def test_the_answer_does_not_wait_for_the_memory_and_the_next_turn_does(app: AppThread, sims: Simulators) -> None:
    with ApiClient(app.url) as api:
        session_id = api.create_session()
        slow_extraction(sims)
        started = time.monotonic()
        turn = api.say(session_id, FACT)
        answered_in = time.monotonic() - started
        assert answered_in < SLOW_EXTRACTION_MS / 1000, answered_in
        assert not {"remember", "summarise"} & set(turn["timings_ms"]), turn["timings_ms"]
        assert stored_now(app, session_id) == 0  # still being extracted

        # The next turn waits for the session, and its reply is given the new memory.
        asked = api.say(session_id, "What do you remember about my pet?")
        assert sims.context(asked["transcript"]) == (2, 1)
        assert stored_now(app, session_id) == 1
        messages = api.session(session_id)["messages"]
        assert [message["role"] for message in messages] == ["user", "assistant"] * 2


def test_a_failed_extraction_after_the_answer_is_skipped(app: AppThread, sims: Simulators) -> None:
    with ApiClient(app.url) as api:
        session_id = api.create_session()
        slow_extraction(sims, status=500)
        turn = api.say(session_id, FACT)
        assert turn["degraded"] == []  # answered before the extraction failed
        app.run(app.companion.settled())
        assert stored_now(app, session_id) == 0
        after = api.say(session_id, "Are you there?")
        assert sims.context(after["transcript"]) == (2, 0)
        assert [message["text"] for message in api.session(session_id)["messages"]][::2] == [FACT, "Are you there?"]


def test_deleting_a_session_waits_for_the_work_after_its_answer(app: AppThread, sims: Simulators) -> None:
    """Its memory is not written after the session is gone."""
    with ApiClient(app.url) as api:
        session_id = api.create_session()
        slow_extraction(sims)
        api.say(session_id, FACT)
        assert api.delete_session(session_id).status_code == 204
        assert stored_now(app, session_id) == 0
        app.run(app.companion.settled())
        assert stored_now(app, session_id) == 0


def test_a_graceful_shutdown_finishes_the_work_after_the_last_answer(sims: Simulators, tmp_path: Path) -> None:
    env = app_environment(sims, tmp_path / "data", new_port())
    with app_process(tmp_path / "logs", env) as running, ApiClient(running.url) as api:
        session_id = api.create_session()
        slow_extraction(sims)
        api.say(session_id, FACT)
        assert running.stop() == 0  # SIGTERM right after the answer, mid-extraction
    with app_process(tmp_path / "logs", env) as running, ApiClient(running.url) as api:
        asked = api.say(session_id, "What do you remember about my pet?")
        assert sims.context(asked["transcript"]) == (2, 1)
        assert httpx.get(f"{running.url}/api/v1/ready", trust_env=False).json()["checks"]["memory"] == "up"
