"""Capability ids in paths stay out of the edge's access log and spans.

The edges here run the shipped `config/edge-policy.toml` (or a policy of their own) in front
of the real recording upstream, and export spans to a real OTLP collector on loopback. For
each request, the upstream must receive the id, while the access line (`path` and `message`),
every other edge log line of the request and the exported span show `{redacted}` in its place
and never the id itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from edge.policy import Policy, RouteRule, load_policy
from tests.servers import RunningEdge, ServerThread, UpstreamApp, running_edge, start_edge
from tests.telemetry_support import (
    ExportedSpan,
    LineCapture,
    OtlpCollector,
    TraceParent,
    capture_edge_logs,
    start_collector,
)

SHIPPED_POLICY = Path(__file__).resolve().parent.parent / "config" / "edge-policy.toml"
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[ServerThread, OtlpCollector]]:
    server, app = start_collector()
    yield server, app
    server.stop()


def exporting(upstream_url: str, collector_url: str, policy: Policy, monkeypatch: pytest.MonkeyPatch) -> RunningEdge:
    """An edge exporting every span to the collector every 100 ms (the batch processor reads
    its delay from the environment when the edge builds it)."""
    endpoint = f"{collector_url}/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    return start_edge(upstream_url, policy, otel_exporter_otlp_traces_endpoint=endpoint)


@pytest.fixture(scope="module")
def shipped_edge(upstream_url: str, collector: tuple[ServerThread, OtlpCollector]) -> Iterator[RunningEdge]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        edge = exporting(upstream_url, collector[0].url, load_policy(SHIPPED_POLICY), monkeypatch)
    try:
        yield edge
    finally:
        edge.server.stop()


@pytest.fixture
def logs() -> Iterator[LineCapture]:
    with capture_edge_logs() as capture:
        yield capture


def send(edge: RunningEdge, method: str, path: str) -> tuple[str, TraceParent]:
    """One request through the edge; returns its request id and the client's (untrusted)
    trace context, which the edge's span links to and so finds it."""
    request_id = f"redact-{uuid.uuid4().hex}"
    client = TraceParent.new("01")
    with httpx.Client(trust_env=False, timeout=10.0) as http:
        response = http.request(
            method, f"{edge.url}{path}", headers={"x-request-id": request_id, "traceparent": client.header()}
        )
    assert response.status_code == 200, (method, path, response.text)
    return request_id, client


def span_linked_to(collector: OtlpCollector, client: TraceParent) -> ExportedSpan:
    [span] = collector.wait_for(lambda: collector.spans_linked_to(client.trace_id), settle=0.0)
    return span


def assert_redacted(
    logs: LineCapture,
    collector: OtlpCollector,
    request_id: str,
    client: TraceParent,
    secret: str,
    *,
    message: str,
    shown: str,
) -> None:
    [access] = logs.wait_for("edge.access", request_id)
    assert access.fields["path"] == shown
    assert access.fields["message"] == message
    for line in logs.matching(request_id=request_id):
        assert secret not in line.text, line.text
    span = span_linked_to(collector, client)
    assert span.attributes["url.path"] == shown
    assert secret not in str(span.span)


def upstream_paths(upstream: UpstreamApp, request_id: str) -> list[str]:
    return [
        request.raw_path.decode()
        for request in upstream.record.requests
        if request.header(b"x-request-id") == [request_id.encode()]
    ]


@pytest.mark.parametrize(
    ("template", "shown"),
    [
        ("/api/v1/sessions/{id}", "/api/v1/sessions/{redacted}"),
        ("/api/v1/sessions/{id}/turns", "/api/v1/sessions/{redacted}/turns"),
        ("/api/v1/sessions/{id}/turns/latest", "/api/v1/sessions/{redacted}/turns/latest"),
        ("/api/v1/audio/{id}", "/api/v1/audio/{redacted}"),
    ],
)
def test_ids_are_redacted_in_access_log_and_span_for_every_method(
    shipped_edge: RunningEdge,
    upstream: UpstreamApp,
    collector: tuple[ServerThread, OtlpCollector],
    logs: LineCapture,
    template: str,
    shown: str,
) -> None:
    for method in METHODS:
        secret = uuid.uuid4().hex
        path = template.format(id=secret)
        request_id, client = send(shipped_edge, method, path)
        assert upstream_paths(upstream, request_id) == [path]  # redaction is for logs only
        assert_redacted(logs, collector[1], request_id, client, secret, message=f"{method} {shown} 200", shown=shown)


def test_paths_without_ids_are_logged_as_they_came(
    shipped_edge: RunningEdge, collector: tuple[ServerThread, OtlpCollector], logs: LineCapture
) -> None:
    for path in ["/api/v1/sessions", "/api/v1/ready", f"/echo/{uuid.uuid4().hex}"]:
        request_id, client = send(shipped_edge, "GET", path)
        [access] = logs.wait_for("edge.access", request_id)
        assert access.fields["path"] == path
        assert access.fields["message"] == f"GET {path} 200"
        assert span_linked_to(collector[1], client).attributes["url.path"] == path


def test_the_query_is_never_logged_and_the_id_is_redacted_under_percent_encoding(
    shipped_edge: RunningEdge,
    upstream: UpstreamApp,
    collector: tuple[ServerThread, OtlpCollector],
    logs: LineCapture,
) -> None:
    # The rule matches the decoded path, so an encoded spelling of the id is redacted too.
    secret = uuid.uuid4().hex
    encoded = "".join(f"%{ord(char):02X}" for char in secret)
    request_id, client = send(shipped_edge, "GET", f"/api/v1/sessions/{encoded}/turns?token={secret}")
    assert upstream_paths(upstream, request_id) == [f"/api/v1/sessions/{encoded}/turns"]
    shown = "/api/v1/sessions/{redacted}/turns"
    assert_redacted(logs, collector[1], request_id, client, secret, message=f"GET {shown} 200", shown=shown)
    [access] = logs.wait_for("edge.access", request_id)
    assert encoded not in access.text


def test_websocket_session_path_is_redacted(
    shipped_edge: RunningEdge, collector: tuple[ServerThread, OtlpCollector], logs: LineCapture
) -> None:
    secret = uuid.uuid4().hex
    request_id = f"redact-ws-{uuid.uuid4().hex}"
    client = TraceParent.new("01")
    with connect(
        f"ws://127.0.0.1:{shipped_edge.port}/api/v1/sessions/{secret}/live",
        additional_headers={"x-request-id": request_id, "traceparent": client.header()},
        open_timeout=5,
    ) as websocket:
        websocket.send("hello")
        assert websocket.recv(timeout=5) == "hello"
    shown = "/api/v1/sessions/{redacted}/live"
    assert_redacted(logs, collector[1], request_id, client, secret, message=f"WEBSOCKET {shown} 101", shown=shown)
    assert span_linked_to(collector[1], client).span.name == "WebSocket"


def test_an_earlier_redact_false_rule_exempts_a_path(upstream_url: str, logs: LineCapture) -> None:
    policy = Policy(
        routes=[
            RouteRule(path="/files/public/**", redact=False),
            RouteRule(path="/files/*/*.png", methods=["GET"], redact=True),
        ]
    )
    with running_edge(upstream_url, policy) as edge:
        public, _ = send(edge, "GET", "/files/public/logo.png")
        private, _ = send(edge, "GET", "/files/alice/portrait.png")
        posted, _ = send(edge, "POST", "/files/alice/portrait.png")
        [public_line] = logs.wait_for("edge.access", public)
        [private_line] = logs.wait_for("edge.access", private)
        [posted_line] = logs.wait_for("edge.access", posted)
    assert public_line.fields["path"] == "/files/public/logo.png"
    assert private_line.fields["path"] == "/files/{redacted}/{redacted}.png"
    assert private_line.fields["message"] == "GET /files/{redacted}/{redacted}.png 200"
    assert posted_line.fields["path"] == "/files/alice/portrait.png"  # the rule is for GET only
