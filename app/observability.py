"""Request context for the app: the request id and a server span, for every log line.

The app sits on a private network behind the edge, so it trusts what the edge sends: the
`X-Request-ID` (re-validated anyway, as the app may be reached directly in development)
and the W3C `traceparent`, which makes the app's spans part of the edge's trace. Every
response echoes the request id. An unexpected failure is logged in full and answered 500
in the envelope, with the request id and nothing else about it.
"""

from __future__ import annotations

import logging

from opentelemetry import context, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.envelope import envelope
from common.ids import ACCEPTABLE_REQUEST_ID, uuid7
from common.logs import request_id_var

logger = logging.getLogger("app.api")

propagator = TraceContextTextMapPropagator()


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, tracer: trace.Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        carrier: dict[str, str] = {}
        request_id: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value
            elif name in (b"traceparent", b"tracestate"):
                carrier[name.decode("latin-1")] = value.decode("latin-1")
        if request_id is None or not ACCEPTABLE_REQUEST_ID.fullmatch(request_id):
            request_id = uuid7().encode("ascii")

        span = self.tracer.start_span(
            scope["method"],  # the path holds session ids: too many distinct names
            context=propagator.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": scope["method"], "url.path": scope["path"]},
        )

        async def send_with_request_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                headers = [(name, value) for name, value in message.get("headers", ()) if name != b"x-request-id"]
                message["headers"] = [*headers, (b"x-request-id", request_id)]
            await send(message)

        response_started = False

        async def send_tracking(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send_with_request_id(message)

        request_token = request_id_var.set(request_id.decode("ascii"))
        span_token = context.attach(trace.set_span_in_context(span))
        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            logger.exception("unhandled error")
            if response_started:
                raise  # the server cuts the connection: a half-sent answer must not look whole
            await send_tracking(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            body = envelope(
                "internal_error", "Something went wrong on our side. Please try again.", request_id_var.get()
            )
            await send_tracking({"type": "http.response.body", "body": body})
        finally:
            span.end()
            context.detach(span_token)
            request_id_var.reset(request_token)
