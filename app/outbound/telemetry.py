"""Spans and metrics of the outbound transport.

- One CLIENT span per attempt (OpenTelemetry HTTP semantic conventions, with
  `http.request.resend_count` on retries); its context goes downstream as `traceparent`.
- A call refused before any attempt (breaker open, 429 block, bulkhead full) has no span
  of its own: it is an event on the caller's span.
- Metrics: `outbound.calls` by outcome, `outbound.retries`,
  `outbound.retries.budget_exhausted`, `outbound.rejections` by reason, and
  `outbound.breaker.state` (1 for each provider's current state at its authority, 0 for
  the others, as resilience4j reports it, so "any breaker open" is a sum).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import httpx
from circuitbreaker import STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN  # type: ignore[import-untyped]
from opentelemetry import metrics, propagate, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode

from app.outbound.host import Host

INSTRUMENTATION_NAME = "app.outbound"


class OutboundTelemetry:
    def __init__(self, tracer: trace.Tracer, meter: metrics.Meter, hosts: Callable[[], Iterable[Host]]) -> None:
        self.tracer = tracer
        self._hosts = hosts
        self._calls = meter.create_counter(
            "outbound.calls", unit="{call}", description="Outbound calls by final outcome"
        )
        self._retries = meter.create_counter(
            "outbound.retries", unit="{retry}", description="Attempts sent again after a failed one"
        )
        self._budget_exhausted = meter.create_counter(
            "outbound.retries.budget_exhausted",
            unit="{retry}",
            description="Retries not sent because the host's retry budget was spent",
        )
        self._rejections = meter.create_counter(
            "outbound.rejections", unit="{call}", description="Calls refused before any attempt, by reason"
        )
        meter.create_observable_gauge(
            "outbound.breaker.state",
            callbacks=[self._observe_states],
            description="1 for each provider's current breaker state at its authority, 0 for its other states",
        )

    def start_attempt(self, request: httpx.Request, host: Host, resend_count: int) -> trace.Span:
        """Starts the attempt's span and writes its context into the request's headers."""
        span = self.tracer.start_span(request.method, kind=SpanKind.CLIENT)
        if span.is_recording():  # only a recording span keeps attributes; building them costs time
            url = request.url
            span.set_attributes(
                {
                    "http.request.method": request.method,
                    "server.address": host.address,
                    "server.port": host.port,
                    "url.full": str(url.copy_with(userinfo=b"") if url.userinfo else url),  # no credentials
                    "outbound.policy": host.policy_name,
                }
            )
            if resend_count:
                span.set_attribute("http.request.resend_count", resend_count)
        # A span that is not recorded still carries the trace on (the API's no-op tracer
        # hands back the caller's span context), so the upstream joins the caller's trace.
        propagate.inject(request.headers, context=trace.set_span_in_context(span))
        return span

    @staticmethod
    def end_attempt(span: trace.Span, *, status: int | None = None, error: BaseException | None = None) -> None:
        if status is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 400:
                span.set_attribute("error.type", str(status))
                span.set_status(Status(StatusCode.ERROR))
        elif error is not None:
            span.set_attribute("error.type", type(error).__qualname__)
            span.set_status(Status(StatusCode.ERROR, str(error)))
        span.end()

    def call_finished(self, host: Host, outcome: str) -> None:
        """outcome: success | failure | rate_limited | deadline_exceeded | rejected | cancelled | error."""
        self._calls.add(1, {**host.attributes, "outbound.outcome": outcome})

    def retried(self, host: Host) -> None:
        self._retries.add(1, host.attributes)

    def retry_budget_exhausted(self, host: Host) -> None:
        self._budget_exhausted.add(1, host.attributes)

    def rejected(self, host: Host, reason: str, retry_after: float | None = None) -> None:
        """reason: breaker_open | rate_limited | bulkhead_full."""
        self._rejections.add(1, {**host.attributes, "outbound.rejection.reason": reason})
        self.call_finished(host, "rejected")
        span = trace.get_current_span()
        if span.is_recording():
            event: dict[str, str | float] = {
                "outbound.authority": host.authority,
                "outbound.rejection.reason": reason,
            }
            if retry_after is not None:
                event["outbound.retry_after"] = retry_after
            span.add_event("outbound.rejected", event)

    def _observe_states(self, options: CallbackOptions) -> Iterable[Observation]:
        for host in self._hosts():
            current = host.breaker.state
            for state in (STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN):
                yield Observation(int(state == current), {**host.attributes, "outbound.breaker.state": state})
