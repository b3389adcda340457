"""Request context for the app: the request id and a server span, for every log line; and
the redaction that keeps capability ids out of every log line and span.

The app sits on a private network behind the edge, so it trusts what the edge sends: the
`X-Request-ID` (re-validated anyway, as the app may be reached directly in development)
and the W3C `traceparent`, which makes the app's spans part of the edge's trace. Every
response echoes the request id. An unexpected failure is logged in full and answered 500
in the envelope, with the request id and nothing else about it; a client that went away
before its request body was read is one info line, and answered nothing.

Session ids and audio ids are capabilities: whoever holds one owns the conversation or
the reply. The request path holds them, so it never goes on a span: the server span is
named and attributed by the matched route template (`http.route`, e.g.
`/api/v1/sessions/{session_id}`) once routing has found one. Messages and tracebacks of
every log line, and recorded exceptions on spans, pass through `redact`, which replaces
any run of 32 or more URL-safe characters - a session id is 32 of them, an audio id 32
hex digits, an embedded memory collection `memories-<session id>` - with `[redacted]`:
libraries log ids the app never chose to (aiosqlite's debug lines carry the statement's
parameters, qdrant-client's warnings name collections). The structured fields the app
itself adds (`extra=`) are left alone; none holds an id.
"""

from __future__ import annotations

import logging
import traceback

from opentelemetry import context, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.envelope import envelope
from common.ids import ACCEPTABLE_REQUEST_ID, uuid7
from common.logs import request_id_var
from common.redaction import redact

logger = logging.getLogger("app.api")
INTERNAL_ERROR = "Something went wrong on our side. Please try again."

propagator = TraceContextTextMapPropagator()


class RedactCapabilities(logging.Filter):
    """A handler filter: the record's message and traceback, redacted, before formatting.

    The traceback is rendered here and handed on as the `exception` field (the JSON
    formatter writes fields it does not know as they are), since the formatter would
    otherwise render it again from `exc_info`, unredacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit the format: the bare format
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exception = redact("".join(traceback.format_exception(*record.exc_info)).rstrip())
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


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

        method = scope["method"]
        span = self.tracer.start_span(
            method,  # renamed after the route below; never the path, which holds ids
            context=propagator.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method},
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
        except ClientDisconnect:
            # Nobody to answer, and nothing wrong on our side: not an error, no traceback.
            span.set_attribute("error.type", "client_disconnected")
            logger.info("the client disconnected before its request was read")
        except Exception as exc:
            record_exception(span, exc)
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
            body = envelope("internal_error", INTERNAL_ERROR, request_id_var.get())
            await send_tracking({"type": "http.response.body", "body": body})
        finally:
            # The router leaves the route it matched in the scope (FastAPI's APIRoute does).
            route = getattr(scope.get("route"), "path", None)
            if isinstance(route, str):
                span.set_attribute("http.route", route)
                span.update_name(f"{method} {route}")
            span.end()
            context.detach(span_token)
            request_id_var.reset(request_token)


def record_exception(span: trace.Span, exc: BaseException) -> None:
    """`Span.record_exception`, with the message and stack trace redacted."""
    span.add_event(
        "exception",
        {
            "exception.type": type(exc).__qualname__,
            "exception.message": redact(str(exc)),
            "exception.stacktrace": redact("".join(traceback.format_exception(exc)).rstrip()),
        },
    )
