"""Tracing: one server span per request, its context passed upstream as W3C `traceparent`.

An incoming `traceparent` is continued only when it comes from a trusted proxy. From
anyone else it starts a new trace (a client must not be able to join, or flood, traces of
its choosing) and the client's span context is kept as a link. The span covers the whole
exchange, streams included, with no span per chunk. Its `url.path` is redacted like the
access log's: the parts that policy rules mark `redact` are `{redacted}`.
"""

from __future__ import annotations

from opentelemetry import context, trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge.policy import PathRedactor
from edge.proxy.ingress import ForwardedRequest
from edge.scope import FORWARDED_SCOPE_KEY

TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})
propagator = TraceContextTextMapPropagator()


class TracingMiddleware:
    def __init__(self, app: ASGIApp, tracer: trace.Tracer, redact: PathRedactor) -> None:
        self.app = app
        self.tracer = tracer
        self.redact = redact

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        incoming: dict[str, str] = {}
        headers = []
        for name, value in scope["headers"]:
            if name in TRACE_HEADERS:
                incoming[name.decode("latin-1")] = value.decode("latin-1")
            else:
                headers.append((name, value))

        forwarded: ForwardedRequest = scope[FORWARDED_SCOPE_KEY]
        parent = None
        links = []
        if incoming:
            extracted = propagator.extract(incoming)
            if forwarded.peer_trusted:
                parent = extracted
            else:
                client_context = trace.get_current_span(extracted).get_span_context()
                if client_context.is_valid:
                    links.append(Link(client_context, {"edge.untrusted_parent": True}))

        method = scope.get("method", "GET")
        span = self.tracer.start_span(
            method if scope["type"] == "http" else "WebSocket",
            context=parent,
            kind=SpanKind.SERVER,
            links=links,
            attributes={
                "http.request.method": method,
                "url.path": self.redact(method, scope["path"]),
                "url.scheme": forwarded.proto,
                "client.address": forwarded.client,
            },
        )
        span_context = trace.set_span_in_context(span)
        carrier: dict[str, str] = {}
        propagator.inject(carrier, context=span_context)
        headers += [(name.encode("latin-1"), value.encode("latin-1")) for name, value in carrier.items()]
        scope["headers"] = headers

        async def send_recording_status(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                status = message["status"]
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
            await send(message)

        token = context.attach(span_context)
        try:
            await self.app(scope, receive, send_recording_status)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            span.end()
            context.detach(token)
