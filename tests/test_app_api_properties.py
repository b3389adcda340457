"""Properties of the app's API, from its own OpenAPI document: schemathesis generates
requests for every operation - valid and invalid bodies, path parameters, content types -
and every response must match the document, never be a server error, and, when it is a
client error, be the project's envelope with the request id. Readiness must name the
outside services and show none of their addresses.

The app runs in a thread (`create_app` under uvicorn) with its OpenAPI document enabled,
in front of two healthy provider simulators; requests go over real HTTP. Half of the
generated session ids are replaced by a real session's, so turns are taken for real
instead of all ending in 404.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case, CheckContext, CheckFunction
from schemathesis.core.transport import Response
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.main import create_app
from app.outbound import OutboundSettings
from app.settings import AppSettings
from tests.app_support import (
    API,
    ApiClient,
    AppThread,
    Simulators,
    app_settings,
    start_app,
)


def the_document() -> dict[str, Any]:
    """The OpenAPI document the app serves, built without serving it (no lifespan runs):
    tests are generated from it when the module is collected. The test below checks that
    the running app serves the same one."""
    settings = AppSettings(feature_api_docs=True, data_dir=Path("unused"))
    document: dict[str, Any] = create_app(settings, OutboundSettings()).openapi()
    return document


DOCUMENT = the_document()
schema = schemathesis.openapi.from_dict(DOCUMENT)


@pytest.fixture(scope="module")
def docs_app(sims: Simulators, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppThread]:
    started = start_app(app_settings(sims, tmp_path_factory.mktemp("properties"), feature_api_docs=True))
    yield started
    started.stop()


@dataclass(frozen=True)
class Existing:
    """A session with one turn taken, and the audio of its reply: what generated ids are
    swapped for half of the time, so requests reach real resources instead of all ending
    in 404."""

    session_id: str
    audio_id: str


@pytest.fixture(scope="module")
def existing(docs_app: AppThread) -> Existing:
    with ApiClient(docs_app.url) as client:
        session_id = client.create_session()
        audio_url = client.say(session_id, "My dog Max is ill.")["audio_url"]
    assert audio_url is not None
    return Existing(session_id, audio_url.rsplit("/", 1)[1])


def swap_half(generated: object) -> bool:
    """Whether to replace this generated id: a pure function of it, so runs repeat."""
    return isinstance(generated, str) and hashlib.sha256(generated.encode()).digest()[0] % 2 == 1


def errors_are_enveloped(ctx: CheckContext, response: Response, case: Case[Any]) -> bool | None:
    """Every 4xx is `{"error": {"code", "message", "request_id", "details"?}}` with the
    response's X-Request-ID."""
    if not 400 <= response.status_code < 500:
        return None
    body = response.json()
    assert isinstance(body, dict), body
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"code", "message", "request_id"} <= set(error) <= {"code", "message", "request_id", "details"}, error
    assert isinstance(error["code"], str), error
    assert error["code"], error
    assert isinstance(error["message"], str), error
    assert error["message"], error
    request_ids = response.headers.get("x-request-id") or []
    assert len(request_ids) == 1, response.headers
    assert error["request_id"] == request_ids[0], (error, response.headers)
    return True


def assert_readiness_names_no_address(response: Response, sims: Simulators) -> None:
    """The public readiness body names the outside services and says nothing of where they
    are: no address, port or URL of a simulator anywhere in it."""
    body = response.json()
    assert set(body["breakers"]) == {"groq", "elevenlabs"}, body
    for sim in (sims.groq, sims.elevenlabs):
        for leak in (sim.url, "127.0.0.1", str(sim.port)):
            assert leak not in response.text, (leak, response.text)


@schema.parametrize()
@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_honours_its_document(
    case: Case[Any], existing: Existing, docs_app: AppThread, sims: Simulators
) -> None:
    parameters = case.path_parameters or {}
    if swap_half(parameters.get("session_id")):
        if case.method.upper() == "DELETE":  # a session of its own, so that the others keep theirs
            with ApiClient(docs_app.url) as client:
                parameters["session_id"] = client.create_session()
        else:
            parameters["session_id"] = existing.session_id
    if swap_half(parameters.get("audio_id")):
        parameters["audio_id"] = existing.audio_id
    response = case.call(base_url=docs_app.url, timeout=30)
    assert response.status_code < 500, (response.status_code, response.text)
    if case.operation.path == f"{API}/ready" and response.status_code in (200, 503):  # not a 405
        assert_readiness_names_no_address(response, sims)
    # A turn's body is checked beyond what a schema can say: the audio must be audio (any
    # bytes fit `format: binary`), the text not blank and not over APP_MAX_TEXT_CHARS. Those
    # refusals (400, 413, 415, 422) are documented for the operation; "schema-valid data is
    # accepted" does not hold for it, every other check does.
    excluded: list[CheckFunction] = [positive_data_acceptance] if case.operation.path.endswith("/turns") else []
    case.validate_response(response, additional_checks=[errors_are_enveloped], excluded_checks=excluded)


def test_the_app_serves_the_document_the_tests_come_from(docs_app: AppThread) -> None:
    document = httpx.get(f"{docs_app.url}{API}/openapi.json", trust_env=False).json()
    assert document == DOCUMENT
    operations = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert operations == {
        ("POST", f"{API}/sessions"),
        ("GET", f"{API}/sessions/{{session_id}}"),
        ("DELETE", f"{API}/sessions/{{session_id}}"),
        ("POST", f"{API}/sessions/{{session_id}}/turns"),
        ("GET", f"{API}/audio/{{audio_id}}"),
        ("GET", f"{API}/health"),
        ("GET", f"{API}/ready"),
    }
