"""Spans, trace context and call outcomes of the outbound transport (retries, rejections and
breaker states are checked with the behaviour that produces them)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from opentelemetry import context, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from app.outbound import DEADLINE_EXTENSION, DeadlineExceeded, Outbound, OutboundSettings
from tests.outbound_support import (
    HANG,
    Reply,
    ScriptedUpstream,
    outbound,
    policy,
    scripted_upstream,
    telemetry,
    wait_for_requests,
)


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with scripted_upstream() as server:
        yield server


def test_an_attempt_span_is_a_child_of_the_callers_span_and_describes_the_call(
    upstream: ScriptedUpstream,
) -> None:
    upstream.script("/v1/text-to-speech/voice", then=200)
    recorded = telemetry()

    async def scenario() -> None:
        out = outbound(policy(), recorded)
        client = out.client("elevenlabs-like", upstream.url)
        with recorded.tracer_provider.get_tracer("caller").start_as_current_span("synthesise reply"):
            await client.post("/v1/text-to-speech/voice?output_format=mp3_44100_128", content=b"{}")
        await out.aclose()

    asyncio.run(scenario())
    attempt, caller = recorded.finished_spans()
    assert (attempt.name, attempt.kind) == ("POST", trace.SpanKind.CLIENT)
    assert attempt.parent is not None
    assert attempt.parent.span_id == caller.context.span_id
    assert dict(attempt.attributes or {}) == {
        "http.request.method": "POST",
        "server.address": "127.0.0.1",
        "server.port": upstream.server.port if upstream.server else 0,
        "url.full": f"{upstream.url}/v1/text-to-speech/voice?output_format=mp3_44100_128",
        "outbound.policy": "elevenlabs-like",
        "http.response.status_code": 200,
    }
    assert attempt.status.status_code == trace.StatusCode.UNSET


def test_the_callers_trace_context_goes_downstream_even_when_nothing_records_spans(
    upstream: ScriptedUpstream,
) -> None:
    upstream.script("/unrecorded", then=200)
    caller = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )

    async def scenario() -> None:
        out = Outbound(OutboundSettings(default=policy()), tracer=trace.NoOpTracer())
        token = context.attach(trace.set_span_in_context(NonRecordingSpan(caller)))
        try:
            await out.client("upstream", upstream.url).get("/unrecorded")
        finally:
            context.detach(token)
        await out.aclose()

    asyncio.run(scenario())
    [request] = upstream.seen_at("/unrecorded")
    assert request.headers["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_calls_are_counted_by_outcome(upstream: ScriptedUpstream) -> None:
    upstream.script("/outcomes", 200, 404, 500, Reply(delay=HANG), Reply(delay=HANG), then=200)
    recorded = telemetry()

    async def scenario() -> None:
        out = outbound(policy(minimum_calls=8), recorded)
        client = out.client("upstream", upstream.url)
        for _ in range(3):
            await client.get("/outcomes")
        with pytest.raises(DeadlineExceeded):
            await client.get("/outcomes", extensions={DEADLINE_EXTENSION: 0.2})
        cancelled = asyncio.ensure_future(client.get("/outcomes"))
        await wait_for_requests(upstream, "/outcomes", 5)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        await out.aclose()

    asyncio.run(scenario())
    host = {("provider", "upstream")}
    assert recorded.metric("app_outbound_calls_total") == {
        frozenset(host | {("outcome", "success")}): 2,  # a 404 is the caller's affair
        frozenset(host | {("outcome", "failure")}): 1,
        frozenset(host | {("outcome", "deadline_exceeded")}): 1,
        frozenset(host | {("outcome", "cancelled")}): 1,
    }
    statuses = [span.status.status_code for span in recorded.finished_spans()]
    assert statuses == [trace.StatusCode.UNSET] + [trace.StatusCode.ERROR] * 4
