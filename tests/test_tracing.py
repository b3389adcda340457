"""Tracing: one server span per request, its context passed upstream as W3C `traceparent`.

Without an exporter the edge still makes trace context (ids and the sampling decision) for
the upstream; a client's `traceparent` is continued only from a trusted proxy, and from
anyone else starts a new trace. With an OTLP endpoint set, the spans reach a real collector
on loopback (`tests.telemetry_support.OtlpCollector`) through the edge's own exporter, and
are checked there against what the upstream received.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from ipaddress import ip_network
from typing import Any

import httpx
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from tests.servers import RunningEdge, ServerThread, closed_port, running_edge, start_edge
from tests.telemetry_support import (
    OtlpCollector,
    TraceParent,
    start_collector,
    upstream_headers,
    upstream_traceparent,
)

LOOPBACK = ip_network("127.0.0.0/8")


def echo(url: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> dict[str, Any]:
    """A request to the upstream's echo endpoint; returns what the upstream received."""
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        response = client.request(method, f"{url}/echo", headers=headers or {})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture(scope="module")
def trusting_edge(upstream_url: str) -> Iterator[RunningEdge]:
    with running_edge(upstream_url, trusted_proxies=[LOOPBACK]) as edge:
        yield edge


# -- propagation without an exporter ---------------------------------------------------------------------


def test_upstream_receives_one_valid_traceparent_per_request(edge: RunningEdge) -> None:
    assert not edge.settings.traces_export_enabled
    seen = [upstream_traceparent(echo(edge.url)) for _ in range(3)]
    # A new trace per request, sampled by the default parent-based ratio 1.0.
    assert len({parent.trace_id for parent in seen}) == 3, seen
    assert all(parent.flags == "01" for parent in seen), seen


@pytest.mark.parametrize("flags", ["01", "00"])
def test_untrusted_client_traceparent_is_not_continued(edge: RunningEdge, flags: str) -> None:
    assert edge.settings.trusted_proxies == []
    client = TraceParent.new(flags)
    received = echo(edge.url, headers={"traceparent": client.header(), "tracestate": "vendor=secret"})
    upstream = upstream_traceparent(received)
    assert upstream.trace_id != client.trace_id
    assert upstream.parent_id != client.parent_id
    # The client picks no sampling decision either: a new trace, sampled at the ratio (1.0).
    assert upstream.flags == "01"
    assert upstream_headers(received, "tracestate") == []


@pytest.mark.parametrize("flags", ["01", "00"])
def test_trusted_proxy_traceparent_is_continued(trusting_edge: RunningEdge, flags: str) -> None:
    client = TraceParent.new(flags)
    received = echo(trusting_edge.url, headers={"traceparent": client.header(), "tracestate": "vendor=kept"})
    upstream = upstream_traceparent(received)
    assert upstream.trace_id == client.trace_id
    assert upstream.parent_id != client.parent_id  # the edge's own span is the new parent
    assert upstream.flags == flags
    assert upstream_headers(received, "tracestate") == ["vendor=kept"]


def test_sampler_always_off_sends_unsampled_flags(upstream_url: str) -> None:
    with running_edge(upstream_url, otel_traces_sampler="always_off") as edge:
        upstream = upstream_traceparent(echo(edge.url))
    assert upstream.flags == "00"


@pytest.mark.parametrize(("ratio", "new_trace_flags"), [(1.0, "01"), (0.0, "00")])
def test_parentbased_traceidratio_samples_new_traces_at_ratio_and_follows_trusted_parent(
    upstream_url: str, ratio: float, new_trace_flags: str
) -> None:
    with running_edge(
        upstream_url,
        otel_traces_sampler="parentbased_traceidratio",
        otel_traces_sampler_arg=ratio,
        trusted_proxies=[LOOPBACK],
    ) as edge:
        new_traces = [upstream_traceparent(echo(edge.url)) for _ in range(5)]
        # A continued trace follows its trusted parent, whatever the ratio says.
        opposite = "00" if new_trace_flags == "01" else "01"
        client = TraceParent.new(opposite)
        continued = upstream_traceparent(echo(edge.url, headers={"traceparent": client.header()}))
    assert [parent.flags for parent in new_traces] == [new_trace_flags] * 5
    assert continued.trace_id == client.trace_id
    assert continued.flags == opposite


# -- export to an OTLP collector --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[ServerThread, OtlpCollector]]:
    server, app = start_collector()
    yield server, app
    server.stop()


def exporter_environment(monkeypatch: pytest.MonkeyPatch, collector_url: str) -> str:
    """Points the exporter at the collector, exporting every 100 ms; returns the endpoint.

    The exporter and its batch processor read these variables when the edge builds them.
    """
    endpoint = f"{collector_url}/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    return endpoint


@pytest.fixture(scope="module")
def exporting_edge(upstream_url: str, collector: tuple[ServerThread, OtlpCollector]) -> Iterator[RunningEdge]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        endpoint = exporter_environment(monkeypatch, collector[0].url)
        edge = start_edge(upstream_url, otel_exporter_otlp_traces_endpoint=endpoint)
    # The variables are gone again: later edges of this module must not export.
    try:
        yield edge
    finally:
        edge.server.stop()


def request(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=10.0) as client:
        return client.request(method, url, headers=headers or {})


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_exported_server_span_matches_what_the_upstream_received(
    exporting_edge: RunningEdge, collector: tuple[ServerThread, OtlpCollector], method: str
) -> None:
    spans = collector[1]
    assert exporting_edge.settings.traces_export_enabled
    path = f"/echo/{uuid.uuid4().hex}"
    response = request(f"{exporting_edge.url}{path}?q=1", method=method)
    assert response.status_code == 200
    upstream = upstream_traceparent(response.json())

    found = spans.wait_for(lambda: spans.spans_of_trace(upstream.trace_id))
    assert len(found) == 1, [span.span.name for span in found]
    span = found[0]
    assert span.span.kind == Span.SPAN_KIND_SERVER
    assert span.span.name == method
    assert span.span_id == upstream.parent_id
    assert span.parent_span_id == ""  # no trusted parent: the root of a new trace
    # Sampled (the SDK may also set W3C level 2's random-trace-id bit, 0x02).
    assert int(upstream.flags, 16) & 0x01
    attributes = span.attributes
    assert attributes["http.request.method"] == method
    assert attributes["url.path"] == path
    assert attributes["http.response.status_code"] == 200
    assert attributes["client.address"] == "127.0.0.1"
    assert span.span.status.code != Status.STATUS_CODE_ERROR
    assert span.resource["service.name"] == "edge"


def test_exported_span_links_untrusted_client_context(
    exporting_edge: RunningEdge, collector: tuple[ServerThread, OtlpCollector]
) -> None:
    spans = collector[1]
    client = TraceParent.new("01")
    response = request(f"{exporting_edge.url}/echo", headers={"traceparent": client.header()})
    upstream = upstream_traceparent(response.json())
    assert upstream.trace_id != client.trace_id

    found = spans.wait_for(lambda: spans.spans_of_trace(upstream.trace_id))
    assert len(found) == 1
    span = found[0]
    assert span.parent_span_id == ""
    assert span.links() == [(client.trace_id, client.parent_id, {"edge.untrusted_parent": True})]
    assert spans.spans_of_trace(client.trace_id) == []


def test_exported_span_continues_trusted_parent(
    upstream_url: str, collector: tuple[ServerThread, OtlpCollector], monkeypatch: pytest.MonkeyPatch
) -> None:
    spans = collector[1]
    endpoint = exporter_environment(monkeypatch, collector[0].url)
    client = TraceParent.new("01")
    with running_edge(upstream_url, otel_exporter_otlp_traces_endpoint=endpoint, trusted_proxies=[LOOPBACK]) as edge:
        response = request(f"{edge.url}/echo", headers={"traceparent": client.header()})
        upstream = upstream_traceparent(response.json())
        found = spans.wait_for(lambda: spans.spans_of_trace(client.trace_id))
    assert upstream.trace_id == client.trace_id
    assert len(found) == 1
    span = found[0]
    assert span.parent_span_id == client.parent_id
    assert span.span_id == upstream.parent_id
    assert span.links() == []


def test_exported_span_of_edge_made_502_has_error_status(
    collector: tuple[ServerThread, OtlpCollector], monkeypatch: pytest.MonkeyPatch
) -> None:
    spans = collector[1]
    endpoint = exporter_environment(monkeypatch, collector[0].url)
    client = TraceParent.new("01")
    with running_edge(f"http://127.0.0.1:{closed_port()}", otel_exporter_otlp_traces_endpoint=endpoint) as edge:
        response = request(f"{edge.url}/nothing-listens", headers={"traceparent": client.header()})
        assert response.status_code == 502
        found = spans.wait_for(lambda: spans.spans_linked_to(client.trace_id))
    assert len(found) == 1
    span = found[0]
    assert span.span.kind == Span.SPAN_KIND_SERVER
    assert span.span.name == "GET"
    assert span.attributes["http.response.status_code"] == 502
    assert span.attributes["url.path"] == "/nothing-listens"
    assert span.span.status.code == Status.STATUS_CODE_ERROR


@pytest.mark.parametrize(
    ("target", "min_duration"),
    [("/sse?n=3&interval=0.2", 0.4), ("/bytes/1000000", 0.0)],
    ids=["sse", "bytes"],
)
def test_streamed_response_is_one_span_covering_the_stream(
    exporting_edge: RunningEdge,
    collector: tuple[ServerThread, OtlpCollector],
    target: str,
    min_duration: float,
) -> None:
    spans = collector[1]
    client = TraceParent.new("01")  # untrusted: becomes a link, which finds the span
    response = request(f"{exporting_edge.url}{target}", headers={"traceparent": client.header()})
    assert response.status_code == 200
    if target.startswith("/sse"):
        assert response.text.count("data: event") == 3
    else:
        assert len(response.content) == 1_000_000

    linked = spans.wait_for(lambda: spans.spans_linked_to(client.trace_id))
    assert len(linked) == 1
    span = linked[0]
    # Nothing else in its trace either: no span per chunk.
    assert [other.span_id for other in spans.spans_of_trace(span.trace_id)] == [span.span_id]
    assert span.attributes["http.response.status_code"] == 200
    assert span.attributes["url.path"] == target.split("?")[0]
    assert span.duration >= min_duration, span.duration
