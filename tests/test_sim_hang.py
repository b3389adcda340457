"""The simulator's hang fault: a provider that never answers, for as long as the client waits."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.servers import ServerThread, wait_until
from tests.sim_support import CHAT_PATH, VOICE, chat_body, client, eleven_headers, groq_headers, running_sim


@pytest.fixture(scope="module")
def sim() -> Iterator[ServerThread]:
    with running_sim() as server:
        yield server


@pytest.fixture
def http(sim: ServerThread) -> Iterator[httpx.Client]:
    with client(sim) as control:
        control.post("/_sim/reset").raise_for_status()
        yield control


def statuses(http: httpx.Client, route: str) -> dict[str, int]:
    counted: dict[str, int] = http.get("/_sim/calls").json()[route]["statuses"]
    return counted


@pytest.mark.parametrize(
    ("route", "path", "headers", "body"),
    [
        ("chat", CHAT_PATH, groq_headers(), chat_body(("user", "hi"))),
        ("speech", f"/v1/text-to-speech/{VOICE}", eleven_headers(), {"text": "hi", "model_id": "eleven_flash_v2_5"}),
    ],
)
def test_a_hung_call_answers_nothing_until_the_client_gives_up(
    http: httpx.Client, sim: ServerThread, route: str, path: str, headers: dict[str, str], body: dict[str, Any]
) -> None:
    added = http.post("/_sim/faults", json={"route": route, "hang": True, "times": 1})
    assert added.status_code == 201, added.text
    assert added.json()["added"][0]["hang"] is True
    with client(sim, timeout=1.0) as impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post(path, headers=headers, json=body)
    assert wait_until(lambda: statuses(http, route) == {"499": 1}, timeout=3), statuses(http, route)
    # `times` used up: the next call is answered.
    assert http.post(path, headers=headers, json=body).status_code == 200


@pytest.mark.parametrize(
    "fault",
    [
        {"route": "chat", "hang": True, "status": 503},
        {"route": "chat", "hang": True, "delay_ms": 100},
        {"route": "speech", "hang": True, "status": 200, "abort_after_bytes": 10},
    ],
    ids=["status", "delay", "abort"],
)
def test_a_hang_with_an_answer_is_refused(http: httpx.Client, fault: dict[str, Any]) -> None:
    response = http.post("/_sim/faults", json=fault)
    assert response.status_code == 400, response.text
    assert "a hang never answers" in response.text
    assert http.get("/_sim/faults").json() == {"faults": []}
