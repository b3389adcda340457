"""Spans and metrics of the outbound transport.

- One CLIENT span per attempt (OpenTelemetry HTTP semantic conventions, with
  `http.request.resend_count` on retries); its context goes downstream as `traceparent`.
- A call refused before any attempt (breaker open, 429 block, bulkhead full) has no span
  of its own: it is an event on the caller's span.
- Prometheus series by provider (docs/metrics.md#the-app), never by address (a Qdrant
  server's is internal): `app_outbound_calls_total` by outcome, `app_outbound_retries_total`,
  `app_outbound_retry_budget_exhausted_total`, `app_outbound_rejections_total` by reason,
  `app_provider_responses_total` by status (429s: quota pressure) and
  `app_breaker_transitions_total` by the state entered. The breakers' current states are
  read when scraped (app/metrics.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import httpx
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CollectorRegistry, Counter

from app.outbound.host import Host

INSTRUMENTATION_NAME = "app.outbound"


@dataclass(frozen=True)
class OutboundMetrics:
    calls: Counter
    retries: Counter
    retry_budget_exhausted: Counter
    rejections: Counter
    responses: Counter
    breaker_transitions: Counter

    @classmethod
    def build(cls, registry: CollectorRegistry) -> OutboundMetrics:
        def counter(name: str, description: str, *labels: str) -> Counter:
            return Counter(name, description, ["provider", *labels], registry=registry)

        return cls(
            calls=counter("app_outbound_calls", "Outbound calls by final outcome", "outcome"),
            retries=counter("app_outbound_retries", "Attempts sent again after a failed one"),
            retry_budget_exhausted=counter(
                "app_outbound_retry_budget_exhausted", "Retries not sent: the host's retry budget was spent"
            ),
            rejections=counter("app_outbound_rejections", "Calls refused before any attempt, by reason", "reason"),
            responses=counter("app_provider_responses", "Providers' HTTP statuses", "status"),
            breaker_transitions=counter("app_breaker_transitions", "Breaker changes, by the state entered", "state"),
        )


class OutboundTelemetry:
    def __init__(self, tracer: trace.Tracer, metrics: OutboundMetrics) -> None:
        self.tracer = tracer
        self.metrics = metrics

    def breaker_moved(self, provider: str) -> Callable[[str], None]:
        """What a provider's breaker calls when it enters a state."""
        transitions = self.metrics.breaker_transitions
        return lambda state: transitions.labels(provider, state).inc()

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

    def end_attempt(
        self, span: trace.Span, host: Host, *, status: int | None = None, error: BaseException | None = None
    ) -> None:
        if status is not None:
            self.metrics.responses.labels(host.policy_name, str(status)).inc()
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
        self.metrics.calls.labels(host.policy_name, outcome).inc()

    def retried(self, host: Host) -> None:
        self.metrics.retries.labels(host.policy_name).inc()

    def retry_budget_exhausted(self, host: Host) -> None:
        self.metrics.retry_budget_exhausted.labels(host.policy_name).inc()

    def rejected(self, host: Host, reason: str, retry_after: float | None = None) -> None:
        """reason: breaker_open | rate_limited | bulkhead_full."""
        self.metrics.rejections.labels(host.policy_name, reason).inc()
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
