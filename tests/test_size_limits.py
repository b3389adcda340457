"""Size limits at the edge: bodies (413) and request headers (431), enforced without
buffering and without troubling the upstream, each refusal naming its limit; and a voice
turn of exactly the app's audio limit let through to the app, which alone refuses more.

Requests whose timing matters (a head sent without its body, a chunked body that stops
half-way) are written on a raw socket; the upstream's record tells what reached it.
"""

from __future__ import annotations

import hashlib
import io
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from edge.policy import Policy, RouteRule
from tests.app_support import (
    ApiClient,
    AppThread,
    Simulators,
    app_settings,
    error_of,
    start_app,
    start_app_edge,
    start_simulators,
)
from tests.concerns_support import assert_envelope, header_pairs, request_head, unique_path
from tests.servers import RunningEdge, ServerThread, UpstreamApp, pattern_bytes, running_edge, wait_until
from tests.wire import WireClient, WireResponse

LIMIT = 64 * 1024
HEADER_COUNT_LIMIT = 20
HEADER_BYTES_LIMIT = 2048
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def limited_edge(upstream_server: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    with running_edge(
        upstream_server[0].url,
        max_body_bytes=LIMIT,
        max_header_count=HEADER_COUNT_LIMIT,
        max_header_bytes=HEADER_BYTES_LIMIT,
        # Bodies up to the limit and past it are read before the upstream hears of them.
        request_buffer_bytes=4 * LIMIT,
    ) as edge:
        yield edge


@pytest.fixture(scope="module")
def streaming_limited_edge(upstream_server: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    """The same limit with request buffering off: every body streams to the upstream."""
    with running_edge(upstream_server[0].url, max_body_bytes=LIMIT, request_buffer_bytes=0) as edge:
        yield edge


@pytest.fixture(scope="module")
def turns_edge(upstream_server: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    policy = Policy(routes=[RouteRule(name="voice-turns", path="/api/v1/sessions/*/turns", max_body_bytes=10 * MiB)])
    with running_edge(upstream_server[0].url, policy, max_body_bytes=1 * MiB) as edge:
        yield edge


def recorded(upstream: UpstreamApp, path: str) -> list[int]:
    """The body lengths of the requests to `path` the upstream finished reading (or gave up on)."""
    return [request.body_length for request in upstream.record.requests if request.raw_path == path.encode()]


def message(response: WireResponse) -> str:
    text: str = response.json()["error"]["message"]
    return text


def declared_only(edge: RunningEdge, path: str, length: int, *, limit: int, expect_continue: bool) -> float:
    """Sends a request head declaring `length` body bytes, and never the body; checks that the
    answer is an immediate 413 naming `limit` and a closed connection, and returns how long
    it took."""
    headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(length))]
    if expect_continue:
        headers.append(("Expect", "100-continue"))
    with WireClient(edge.port) as connection:
        started = time.monotonic()
        connection.send(request_head("POST", path, headers))
        response = connection.read_response()
        elapsed = time.monotonic() - started
        assert response.status != 100, "100 Continue invites a body the edge will refuse"
        assert response.status == 413, response.body
        assert response.values("connection") == [b"close"]
        assert_envelope(413, header_pairs(response), response.body, "payload_too_large")
        assert message(response) == f"The request body is larger than {limit:,} bytes."
        assert connection.closed_by_peer(), "the edge should close rather than wait for the body"
        assert connection.buffer == b"", "nothing may follow the 413"
    return elapsed


# -- declared lengths -------------------------------------------------------------------------------


@pytest.mark.parametrize("expect_continue", [True, False], ids=["expect-100-continue", "plain"])
def test_declared_length_over_the_limit_is_413_at_once_and_never_forwarded(
    limited_edge: RunningEdge, upstream: UpstreamApp, expect_continue: bool
) -> None:
    path = unique_path()
    elapsed = declared_only(limited_edge, path, LIMIT + 1, limit=LIMIT, expect_continue=expect_continue)
    assert elapsed < 1.0
    assert recorded(upstream, path) == []
    assert not any(disconnect[0] == path for disconnect in upstream.record.disconnects)


def test_declared_length_within_the_limit_is_invited_and_forwarded(
    limited_edge: RunningEdge, upstream: UpstreamApp
) -> None:
    # The other side of the test above: the same raw client does see 100 Continue, so its
    # absence there means something.
    path = unique_path()
    head = request_head("POST", path, [("Content-Length", "5"), ("Expect", "100-continue")])
    with WireClient(limited_edge.port) as connection:
        connection.send(head)
        interim = connection.read_response()
        assert interim.status == 100
        connection.send(b"hello")
        response = connection.read_response()
    assert response.status == 200
    assert response.json()["body_length"] == 5
    assert recorded(upstream, path) == [5]


def test_body_exactly_at_the_limit_passes(limited_edge: RunningEdge, upstream: UpstreamApp) -> None:
    path = unique_path()
    response = httpx.post(limited_edge.url + path, content=b"x" * LIMIT, timeout=10)
    assert response.status_code == 200
    assert response.json()["body_length"] == LIMIT
    assert recorded(upstream, path) == [LIMIT]


def test_chunked_body_exactly_at_the_limit_passes(limited_edge: RunningEdge, upstream: UpstreamApp) -> None:
    path = unique_path()
    response = httpx.post(limited_edge.url + path, content=pattern_bytes(LIMIT, chunk=4096), timeout=10)
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert response.status_code == 200
    assert response.json()["body_length"] == LIMIT
    assert recorded(upstream, path) == [LIMIT]


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_client_sending_an_oversized_body_anyway_still_gets_the_413(
    limited_edge: RunningEdge, upstream: UpstreamApp, framing: str
) -> None:
    # A client that does not wait for 100 Continue writes its whole body; the edge does not
    # read it, yet the client must still be able to read the answer.
    path = unique_path()
    size = 4 * MiB
    body = b"".join(pattern_bytes(size)) if framing == "length" else pattern_bytes(size, chunk=16384)
    response = httpx.post(limited_edge.url + path, content=body, timeout=10)
    assert response.status_code == 413
    assert_envelope(413, header_pairs(response), response.content, "payload_too_large")
    assert response.json()["error"]["message"] == "The request body is larger than 65,536 bytes."
    assert all(length <= LIMIT for length in recorded(upstream, path))


# -- chunked bodies ---------------------------------------------------------------------------------


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def send_chunks_past_the_limit(edge: RunningEdge, path: str) -> tuple[int, float]:
    """Streams a chunked body past LIMIT without ever ending it; checks the 413 and the closed
    connection, and returns the bytes sent and how long the answer took after the last one."""
    head = request_head("POST", path, [("Transfer-Encoding", "chunked")])
    piece = b"y" * 8192
    sent = 0
    with WireClient(edge.port) as connection:
        connection.send(head + chunk(piece))
        sent += len(piece)
        time.sleep(0.2)  # the head and the first chunk are on their way
        while sent <= LIMIT:
            connection.send(chunk(piece))
            sent += len(piece)
        # No terminating chunk: the client could go on sending; the edge must not wait.
        started = time.monotonic()
        response = connection.read_response()
        elapsed = time.monotonic() - started
        assert response.status == 413, response.body
        assert response.values("connection") == [b"close"]
        assert_envelope(413, header_pairs(response), response.body, "payload_too_large")
        assert message(response) == "The request body is larger than 65,536 bytes."
        assert connection.closed_by_peer()
    return sent, elapsed


def test_chunked_body_growing_past_the_limit_is_413_and_the_upstream_exchange_is_aborted(
    streaming_limited_edge: RunningEdge, upstream: UpstreamApp
) -> None:
    path = unique_path("/upload")
    sent, elapsed = send_chunks_past_the_limit(streaming_limited_edge, path)
    assert elapsed < 1.0
    assert wait_until(lambda: any(gone[0] == path for gone in upstream.record.disconnects), 3), (
        "the upstream never saw its exchange end early"
    )
    lengths = recorded(upstream, path)
    assert all(length <= LIMIT for length in lengths), f"the upstream got more than the limit: {lengths}"
    assert sent not in lengths


def test_chunked_body_past_the_limit_within_the_request_buffer_never_reaches_the_upstream(
    limited_edge: RunningEdge, upstream: UpstreamApp
) -> None:
    # The edge reads up to EDGE_REQUEST_BUFFER_BYTES (here above the limit) before it opens
    # the upstream exchange.
    path = unique_path("/upload")
    _, elapsed = send_chunks_past_the_limit(limited_edge, path)
    assert elapsed < 1.0
    time.sleep(0.2)
    assert recorded(upstream, path) == []


# -- per-route limits -------------------------------------------------------------------------------


def test_route_rule_raises_the_limit_for_its_route_only(turns_edge: RunningEdge, upstream: UpstreamApp) -> None:
    size = 2 * MiB
    path = "/api/v1/sessions/" + unique_path("").strip("/") + "/turns"
    response = httpx.post(turns_edge.url + path, content=b"".join(pattern_bytes(size)), timeout=10)
    assert response.status_code == 200
    assert response.json()["body_length"] == size
    assert recorded(upstream, path) == [size]

    for elsewhere in (
        unique_path("/api/v1/sessions/abc/history"),  # another route: the 1 MiB default
        "/api/v1/sessions/a/b/turns" + unique_path(""),  # not matched: * is one segment
        path.replace("/turns", "/turns-extra"),
    ):
        declared_only(turns_edge, elsewhere, size, limit=MiB, expect_continue=False)
        assert recorded(upstream, elsewhere) == []


def test_route_rule_limit_is_still_a_limit(turns_edge: RunningEdge, upstream: UpstreamApp) -> None:
    path = "/api/v1/sessions/" + unique_path("").strip("/") + "/turns"
    declared_only(turns_edge, path, 10 * MiB + 1, limit=10 * MiB, expect_continue=True)
    assert recorded(upstream, path) == []


# -- headers ----------------------------------------------------------------------------------------


def test_too_many_headers_is_431_and_never_forwarded(limited_edge: RunningEdge, upstream: UpstreamApp) -> None:
    path = unique_path()
    headers = [(f"X-Filler-{number}", "x") for number in range(HEADER_COUNT_LIMIT + 1)]
    with WireClient(limited_edge.port) as connection:
        connection.send(request_head("GET", path, headers))
        response = connection.read_response()
        assert response.status == 431
        assert response.values("connection") == [b"close"]
        assert_envelope(431, header_pairs(response), response.body, "headers_too_large")
        assert message(response) == "The request has more than 20 header fields."
    assert recorded(upstream, path) == []


def test_the_count_is_of_the_clients_own_fields(limited_edge: RunningEdge, upstream: UpstreamApp) -> None:
    # Exactly the limit, Host included: the fields the edge adds on the way (X-Request-ID,
    # traceparent) must not push the request over it.
    path = unique_path()
    headers = [(f"X-Filler-{number}", "x") for number in range(HEADER_COUNT_LIMIT - 1)]
    with WireClient(limited_edge.port) as connection:
        connection.send(request_head("GET", path, headers))
        response = connection.read_response()
    assert response.status == 200, response.body
    assert recorded(upstream, path) == [0]


def test_too_many_header_bytes_is_431_and_never_forwarded(limited_edge: RunningEdge, upstream: UpstreamApp) -> None:
    path = unique_path()
    with WireClient(limited_edge.port) as connection:
        connection.send(request_head("GET", path, [("X-Big", "b" * HEADER_BYTES_LIMIT)]))
        response = connection.read_response()
        assert response.status == 431
        assert response.values("connection") == [b"close"]
        assert_envelope(431, header_pairs(response), response.body, "headers_too_large")
        assert message(response) == "The request headers are larger than 2,048 bytes."
    assert recorded(upstream, path) == []


def test_headers_within_the_limits_pass(limited_edge: RunningEdge, upstream: UpstreamApp) -> None:
    path = unique_path()
    headers = [(f"X-Filler-{number}", "x") for number in range(HEADER_COUNT_LIMIT // 2)]
    headers.append(("X-Big", "b" * (HEADER_BYTES_LIMIT // 2)))
    response = httpx.get(limited_edge.url + path, headers=headers, timeout=5)
    assert response.status_code == 200
    assert recorded(upstream, path) == [0]


# -- a voice turn through the edge in front of the app ------------------------------------------------


# The shipped policy's turn limit: the app's 10 MiB of audio and 64 KiB of multipart envelope.
TURN_BODY_LIMIT = 10 * MiB + 64 * 1024


@dataclass
class VoiceStack:
    """The app with its default limits, behind the edge as deployed, and the simulators."""

    edge: RunningEdge
    api: ApiClient
    app: AppThread
    sims: Simulators


@pytest.fixture(scope="module")
def voice_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VoiceStack]:
    sims = start_simulators()
    app = start_app(app_settings(sims, tmp_path_factory.mktemp("voice-app")))
    edge = start_app_edge(app.url)
    api = ApiClient(edge.url, timeout=60.0)
    yield VoiceStack(edge, api, app, sims)
    api.close()
    edge.server.stop()
    app.stop()
    sims.stop()


def wav_of_size(size: int) -> bytes:
    """A 16-bit mono 48 kHz WAV of exactly `size` bytes, its 44-byte header included."""
    frames = (size - 44) // 2
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(48000)
        out.writeframes(b"".join(pattern_bytes(frames * 2)))
    audio = buffer.getvalue()
    assert len(audio) == size
    return audio


def test_a_recording_of_exactly_the_apps_limit_passes_the_edge_and_is_transcribed(voice_stack: VoiceStack) -> None:
    voice_stack.sims.reset()
    audio = wav_of_size(voice_stack.app.settings.max_audio_bytes)
    session_id = voice_stack.api.create_session()
    response = voice_stack.api.voice_turn(session_id, audio, filename="recording.wav", content_type="audio/wav")
    assert response.status_code == 200, response.text
    # The simulator's transcript is derived from the bytes it received: all of them arrived.
    assert response.json()["transcript"].startswith(f"Sim transcript {hashlib.sha256(audio).hexdigest()[:8]}: ")
    assert voice_stack.sims.statuses("transcribe") == {"200": 1}


def test_a_recording_one_byte_over_the_apps_limit_is_refused_by_the_app(voice_stack: VoiceStack) -> None:
    voice_stack.sims.reset()
    audio = wav_of_size(voice_stack.app.settings.max_audio_bytes) + b"\0"
    session_id = voice_stack.api.create_session()
    response = voice_stack.api.voice_turn(session_id, audio, filename="recording.wav", content_type="audio/wav")
    assert response.status_code == 413, response.text
    # The app's envelope and words, not the edge's `payload_too_large`.
    error = error_of(response)
    assert error["code"] == "audio_too_large"
    assert error["message"] == "The recording is larger than the 10 MB accepted."
    assert voice_stack.sims.calls()["transcribe"] == 0


def test_a_turn_body_past_the_multipart_allowance_is_refused_by_the_edge(voice_stack: VoiceStack) -> None:
    session_id = voice_stack.api.create_session()
    path = f"/api/v1/sessions/{session_id}/turns"
    declared_only(voice_stack.edge, path, TURN_BODY_LIMIT + 1, limit=TURN_BODY_LIMIT, expect_continue=True)
