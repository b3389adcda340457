"""The app's HTTP surface, on `python -m app` (uvloop and httptools, as deployed): HEAD on
every GET route, 501 for methods nothing implements, 405 with `Allow` for the others, and a
client that leaves in the middle of its upload."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.api.routes import router
from app.main import create_app
from app.settings import AppSettings
from tests.app_support import (
    API,
    ApiClient,
    Simulators,
    app_environment,
    app_process,
    app_settings,
    error_of,
    fast_outbound,
    new_port,
)
from tests.processes import ServiceProcess
from tests.servers import serve, wait_until
from tests.sim_support import wav_file

# Headers that differ between any two responses.
PER_RESPONSE = {"date", "x-request-id"}


@pytest.fixture(scope="module")
def app(sims: Simulators, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    tmp = tmp_path_factory.mktemp("http-app")
    env = app_environment(sims, tmp / "data", new_port(), APP_FEATURE_API_DOCS="true")
    with app_process(tmp / "logs", env) as process:
        yield process


@pytest.fixture
def api(app: ServiceProcess) -> Iterator[ApiClient]:
    with ApiClient(app.url) as client:
        yield client


def log_lines(app: ServiceProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in app.stdout().splitlines() if line.startswith("{")]


# -- HEAD ----------------------------------------------------------------------------------------------------


def concrete(template: str, ids: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda match: ids[match.group(1)], template)


def test_head_answers_every_get_route_with_the_gets_head_and_no_body(api: ApiClient, sims: Simulators) -> None:
    session_id = api.create_session()
    turn = api.say(session_id, "Say something I can listen to.")
    assert turn["audio_url"] is not None
    ids = {"session_id": session_id, "audio_id": turn["audio_url"].rsplit("/", 1)[1]}
    # The app's own list: the API's routes and FastAPI's (docs on, as in the fixture).
    listed = [*router.routes, *create_app(AppSettings(feature_api_docs=True), fast_outbound()).routes]
    routes = {getattr(route, "path", "") for route in listed if "GET" in (getattr(route, "methods", None) or ())}
    assert {f"{API}/audio/{{audio_id}}", f"{API}/sessions/{{session_id}}", f"{API}/health"} <= routes
    # Every GET route, and one answer of each that is an error.
    paths = [concrete(template, ids) for template in sorted(routes)]
    paths += [f"{API}/sessions/{'A' * 32}", f"{API}/audio/{'0' * 32}"]
    for path in paths:
        get, head = api.http.get(path), api.http.head(path)
        assert head.status_code == get.status_code, (path, head.status_code, get.status_code)
        assert head.content == b"", path
        strip = {name: value for name, value in get.headers.items() if name not in PER_RESPONSE}
        assert {name: value for name, value in head.headers.items() if name not in PER_RESPONSE} == strip, path
        assert int(head.headers["content-length"]) == len(get.content), path
    audio = api.http.head(turn["audio_url"])
    assert audio.headers["content-type"] == "audio/mpeg"
    assert int(audio.headers["content-length"]) > 0


# -- methods -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["PROPFIND", "SEARCH", "PURGE", "MKCOL"])
@pytest.mark.parametrize("path", [f"{API}/sessions", f"{API}/health", f"{API}/nothing-here"])
def test_a_method_nothing_implements_is_501_in_the_envelope(api: ApiClient, method: str, path: str) -> None:
    response = api.http.request(method, path)
    assert response.status_code == 501, response.text
    assert error_of(response)["code"] == "not_implemented"
    assert "allow" not in response.headers


def test_a_method_the_parser_of_the_deployed_server_refuses_is_501_where_it_reaches_the_app(
    sims: Simulators, tmp_path: Path
) -> None:
    # llhttp (httptools, and the edge's parser) answers BREW 400 before any app sees it;
    # h11 passes any token, and then the app answers it.
    server = serve(create_app(app_settings(sims, tmp_path), fast_outbound()), lifespan="on", http="h11")
    try:
        with ApiClient(server.url) as client:
            response = client.http.request("BREW", f"{API}/health")
            assert response.status_code == 501, response.text
            assert error_of(response)["code"] == "not_implemented"
            assert client.http.head(f"{API}/health").status_code == 200
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", f"{API}/sessions", {"POST"}),
        ("PATCH", f"{API}/sessions/{'A' * 32}", {"GET", "HEAD", "DELETE"}),
        ("DELETE", f"{API}/health", {"GET", "HEAD"}),
        ("POST", f"{API}/audio/{'0' * 32}", {"GET", "HEAD"}),
        ("QUERY", f"{API}/sessions", {"POST"}),
    ],
)
def test_a_defined_method_a_route_does_not_allow_is_405_with_allow(
    api: ApiClient, method: str, path: str, allowed: set[str]
) -> None:
    response = api.http.request(method, path)
    assert response.status_code == 405, response.text
    assert error_of(response)["code"] == "method_not_allowed"
    assert {name.strip() for name in response.headers["allow"].split(",")} == allowed


# -- a client that leaves mid-upload -------------------------------------------------------------------------


def test_a_client_leaving_during_its_upload_is_one_info_line(
    api: ApiClient, app: ServiceProcess, sims: Simulators
) -> None:
    sims.reset()
    session_id = api.create_session()
    before = len(log_lines(app))
    audio = wav_file(1.0)
    boundary = "upload-boundary"
    part = (
        f'--{boundary}\r\ncontent-disposition: form-data; name="audio"; filename="a.wav"\r\n'
        "content-type: audio/wav\r\n\r\n"
    ).encode() + audio
    declared = len(part) + len(f"\r\n--{boundary}--\r\n")
    with socket.create_connection(("127.0.0.1", app.port)) as sock:
        sock.sendall(
            f"POST {API}/sessions/{session_id}/turns HTTP/1.1\r\nhost: app\r\n"
            f"content-type: multipart/form-data; boundary={boundary}\r\ncontent-length: {declared}\r\n\r\n".encode()
            + part[: len(part) // 2]
        )
        time.sleep(0.3)  # the app is reading the body when the client goes
    assert wait_until(lambda: len(log_lines(app)) > before, timeout=5), app.output()
    time.sleep(0.3)  # anything else it would log about the request
    new = log_lines(app)[before:]
    assert [(line["level"], line["message"]) for line in new] == [
        ("info", "the client disconnected before its request was read")
    ], new
    assert "Traceback" not in app.stdout() + app.stderr()
    assert sims.calls() == {"chat": 0, "transcribe": 0, "speech": 0}
    # The app is as it was: the session untouched, the next request answered.
    assert api.session(session_id)["messages"] == []
    assert api.get(f"{API}/health").status_code == 200


def test_a_client_leaving_during_a_text_body_is_one_info_line(api: ApiClient, app: ServiceProcess) -> None:
    session_id = api.create_session()
    before = len(log_lines(app))
    with socket.create_connection(("127.0.0.1", app.port)) as sock:
        sock.sendall(
            f"POST {API}/sessions/{session_id}/turns HTTP/1.1\r\nhost: app\r\n"
            "content-type: application/json\r\ncontent-length: 500\r\n\r\n".encode()
            + b'{"text": "half of wh'
        )
        time.sleep(0.3)
    assert wait_until(lambda: len(log_lines(app)) > before, timeout=5), app.output()
    time.sleep(0.3)
    assert [line["message"] for line in log_lines(app)[before:]] == [
        "the client disconnected before its request was read"
    ]
    assert isinstance(httpx.get(f"{app.url}{API}/health", trust_env=False).json(), dict)
