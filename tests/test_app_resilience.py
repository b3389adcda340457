"""The app's outbound resilience end to end, on real sockets.

- Providers at one address: `make run` points Groq and ElevenLabs at one simulator; each
  keeps its own breaker, concurrency limit and policy there, and nothing is logged about
  the sharing (docs/resilience.md#using-it).
- A hung provider costs its step's budget: the turn answers as the designed degradation
  says - a text reply without speech, `reply_unavailable`, `transcription_unavailable` -
  once the budget is spent, not when an attempt times out (docs/resilience.md#a-turns-time).
  The budgets are short here; the default ones are measured in bench/turn_budget_bench.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.outbound import OutboundSettings
from tests.app_support import (
    API,
    ApiClient,
    AppThread,
    Route,
    Simulators,
    app_process,
    app_settings,
    error_of,
    new_port,
    running_app,
)
from tests.servers import ServerThread, wait_until
from tests.sim_support import ELEVEN_KEY, GROQ_KEY, running_sim, wav_file

# More calls than a default breaker's minimum (10), all failing: enough to open it.
TO_OPEN_A_BREAKER = 10

# Each step's budget in the budget tests, and a generous bound on the turn that still lies
# below the default budgets (7 s, 9 s) and the attempt timeout that would otherwise cut a
# hung call (10 s, tests/app_support.py): only the configured budget can meet it.
BUDGET_S = 1.0
WITHIN_BUDGET_S = 5.0


# -- providers at one address ------------------------------------------------------------------------------


@pytest.fixture
def one_sim() -> Iterator[ServerThread]:
    with running_sim() as server:
        yield server


def fault(sim: ServerThread, **spec: Any) -> None:
    response = httpx.post(f"{sim.url}/_sim/faults", json=spec, trust_env=False)
    assert response.status_code == 201, response.text


def sim_calls(sim: ServerThread) -> dict[str, Any]:
    calls: dict[str, Any] = httpx.get(f"{sim.url}/_sim/calls", trust_env=False).json()
    return calls


def fail_every_reply(api: ApiClient, session_id: str, turns: int) -> None:
    for _ in range(turns):
        response = api.text_turn(session_id, "Hello?")
        assert response.status_code == 503, response.text
        assert error_of(response)["code"] == "reply_unavailable"


def test_providers_sharing_an_address_keep_their_own_breakers_and_limits(
    one_sim: ServerThread, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = app_settings(
        Simulators(groq=one_sim, elevenlabs=one_sim), tmp_path / "data", log_level="info"
    )  # both base URLs on the one simulator, as `make run` has them
    with caplog.at_level(logging.INFO), running_app(settings, OutboundSettings()) as app:  # the default policies
        started = [record for record in caplog.records if record.levelno >= logging.WARNING]
        assert started == [], [record.getMessage() for record in started]
        with ApiClient(app.url) as api:
            session_id = api.create_session()
            fault(one_sim, route="chat", status=503)
            fail_every_reply(api, session_id, TO_OPEN_A_BREAKER)
            refused = api.text_turn(session_id, "Hello?")
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["retry-after"]) > 5  # the breaker's open time, not the default
            assert sim_calls(one_sim)["chat"]["received"] == TO_OPEN_A_BREAKER  # refused by the breaker
            assert api.get(f"{API}/ready").json()["breakers"] == {"groq": "open", "elevenlabs": "closed"}

            # ElevenLabs still goes through, on its own 3 slots: the simulator's plan allows 3
            # at once and refuses a 4th, so 6 together only pass if the app queues them.
            httpx.put(f"{one_sim.url}/_sim/latency", json={"speech": 300}, trust_env=False).raise_for_status()
            spoken = app.run(speak_together(app, 6))
            assert spoken == ["audio/mpeg"] * 6
            assert sim_calls(one_sim)["speech"]["statuses"] == {"200": 6}
    opened = [record.__dict__.get("provider") for record in caplog.records if record.getMessage().endswith("-> open")]
    assert opened == ["groq"]


async def speak_together(app: AppThread, count: int) -> list[str]:
    services, settings = app.companion.services, app.companion.settings

    async def speak() -> str:
        _, content_type = await services.elevenlabs.speak(
            "Still here.",
            voice_id=settings.elevenlabs_voice_id,
            model=settings.speech_model,
            output_format=settings.speech_output_format,
            deadline=10.0,
        )
        return content_type

    return list(await asyncio.gather(*(speak() for _ in range(count))))


def test_the_app_started_as_make_run_starts_it_logs_no_warning_and_reports_each_provider(
    one_sim: ServerThread, tmp_path: Path
) -> None:
    # `python -m app` with the default policies and both providers on one simulator: ElevenLabs
    # failing alone opens ElevenLabs' breaker, while Groq's, at the same address, keeps answering.
    env = {
        "APP_HOST": "127.0.0.1",
        "APP_PORT": str(new_port()),
        "APP_DATA_DIR": str(tmp_path / "data"),
        "APP_LOG_LEVEL": "info",
        "GROQ_BASE_URL": f"{one_sim.url}/openai/v1",
        "ELEVENLABS_BASE_URL": one_sim.url,
        "GROQ_API_KEY": GROQ_KEY,
        "ELEVENLABS_API_KEY": ELEVEN_KEY,
    }
    with app_process(tmp_path / "logs", env) as app, ApiClient(app.url) as api:
        fault(one_sim, route="speech", status=503)
        session_id = api.create_session()
        for _ in range(TO_OPEN_A_BREAKER + 1):
            turn = api.say(session_id, "Can you hear me?")
            assert turn["degraded"] == ["speech"], turn
            assert turn["reply"]
        assert sim_calls(one_sim)["speech"]["received"] == TO_OPEN_A_BREAKER  # the last refused at once
        assert api.get(f"{API}/ready").json()["breakers"] == {"groq": "closed", "elevenlabs": "open"}
        lines = [json.loads(line) for line in app.stdout().splitlines() if line.startswith("{")]
    warnings = [(line["logger"], line["message"]) for line in lines if line["level"] in ("warning", "error")]
    assert warnings == [("app.outbound", f"circuit breaker for elevenlabs at {one_sim.url[7:]}: closed -> open")]


# -- a hung provider costs its step's budget ---------------------------------------------------------------


@pytest.fixture(scope="module")
def budget_app(sims: Simulators, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppThread]:
    budgets = {f"{step}_budget_s": BUDGET_S for step in ("transcribe", "reply", "speak", "remember", "summarise")}
    with running_app(app_settings(sims, tmp_path_factory.mktemp("budget-app"), **budgets)) as app:
        yield app


@pytest.fixture
def budget_api(budget_app: AppThread, sims: Simulators) -> Iterator[ApiClient]:
    sims.reset()
    with ApiClient(budget_app.url) as client:
        yield client
    sims.clear_faults()


def timed(call: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def hang(sims: Simulators, route: Route) -> None:
    fault(sims.server_for(route), route=route, hang=True, times=1)


def gave_up_on(sims: Simulators, route: Route) -> bool:
    """The app hung up on the hung call (the simulator counts it 499)."""
    return wait_until(lambda: sims.statuses(route).get("499") == 1, timeout=5)


def test_hung_speech_gives_a_text_reply_within_its_budget(budget_api: ApiClient, sims: Simulators) -> None:
    session_id = budget_api.create_session()
    hang(sims, "speech")
    response, elapsed = timed(lambda: budget_api.text_turn(session_id, "Are you there?"))
    assert response.status_code == 200, response.text
    turn = response.json()
    assert (turn["audio_url"], turn["degraded"]) == (None, ["speech"])
    assert turn["reply"] == "Yes, I'm here and listening."
    assert elapsed < WITHIN_BUDGET_S, elapsed
    assert gave_up_on(sims, "speech"), sims.statuses("speech")


def test_a_hung_model_gives_reply_unavailable_within_its_budget(budget_api: ApiClient, sims: Simulators) -> None:
    session_id = budget_api.create_session()
    hang(sims, "chat")
    response, elapsed = timed(lambda: budget_api.text_turn(session_id, "Please remember this."))
    assert response.status_code == 503, response.text
    assert error_of(response)["code"] == "reply_unavailable"
    assert response.headers["retry-after"].isdigit()
    assert elapsed < WITHIN_BUDGET_S, elapsed
    assert gave_up_on(sims, "chat"), sims.statuses("chat")
    # The user's words are kept, as when the model is down.
    messages = budget_api.session(session_id)["messages"]
    assert [(message["role"], message["text"]) for message in messages] == [("user", "Please remember this.")]


def test_a_hung_transcriber_gives_transcription_unavailable_within_its_budget(
    budget_api: ApiClient, sims: Simulators
) -> None:
    session_id = budget_api.create_session()
    hang(sims, "transcribe")
    response, elapsed = timed(lambda: budget_api.voice_turn(session_id, wav_file(1.0), "a.wav", "audio/wav"))
    assert response.status_code == 503, response.text
    assert error_of(response)["code"] == "transcription_unavailable"
    assert elapsed < WITHIN_BUDGET_S, elapsed
    assert gave_up_on(sims, "transcribe"), sims.statuses("transcribe")
    assert budget_api.session(session_id)["messages"] == []
    assert sims.calls()["chat"] == 0
