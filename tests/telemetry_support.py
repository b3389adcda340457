"""Helpers for the tracing and access-log tests: a tiny OTLP/HTTP collector on loopback,
a log handler that formats lines as the edge writes them, and W3C `traceparent` helpers.

The collector is a real HTTP server (uvicorn, on `tests.servers.ServerThread`): the edge's
own OTLP exporter posts protobuf bodies to it over a loopback socket, exactly as it would to
a real collector. The log handler uses the edge's `JsonFormatter` and formats each record
when it is emitted, on the edge's thread and inside the request's context, because that is
where the formatter finds the request id and the trace id.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from starlette.types import Receive, Scope, Send

from common.logs import JsonFormatter
from tests.servers import ServerThread, serve

# -- W3C trace context ----------------------------------------------------------------------------------

TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


@dataclass(frozen=True)
class TraceParent:
    trace_id: str
    parent_id: str
    flags: str

    @classmethod
    def parse(cls, value: str) -> TraceParent:
        match = TRACEPARENT.fullmatch(value)
        assert match is not None, f"not a valid traceparent: {value!r}"
        trace_id, parent_id, flags = match.groups()
        assert trace_id != "0" * 32, f"all-zero trace id: {value!r}"
        assert parent_id != "0" * 16, f"all-zero parent id: {value!r}"
        return cls(trace_id, parent_id, flags)

    @classmethod
    def new(cls, flags: str = "01") -> TraceParent:
        return cls(secrets.token_hex(16), secrets.token_hex(8), flags)

    def header(self) -> str:
        return f"00-{self.trace_id}-{self.parent_id}-{self.flags}"


def upstream_headers(echo_body: dict[str, Any], name: str) -> list[str]:
    """The values of header `name` as the upstream's echo endpoint received them."""
    return [value for key, value in echo_body["headers"] if key.lower() == name]


def upstream_traceparent(echo_body: dict[str, Any]) -> TraceParent:
    """The one `traceparent` the upstream received (fails unless there is exactly one)."""
    values = upstream_headers(echo_body, "traceparent")
    assert len(values) == 1, f"the upstream received {len(values)} traceparent headers: {values}"
    return TraceParent.parse(values[0])


# -- an OTLP/HTTP trace collector -------------------------------------------------------------------------


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return attribute_dict(value.kvlist_value.values)
    return getattr(value, kind)


def attribute_dict(attributes: Any) -> dict[str, Any]:
    items: list[KeyValue] = list(attributes)
    return {item.key: any_value(item.value) for item in items}


@dataclass(frozen=True)
class ExportedSpan:
    resource: dict[str, Any]
    scope_name: str
    span: Span

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_span_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def attributes(self) -> dict[str, Any]:
        return attribute_dict(self.span.attributes)

    @property
    def duration(self) -> float:
        return (self.span.end_time_unix_nano - self.span.start_time_unix_nano) / 1e9

    def links(self) -> list[tuple[str, str, dict[str, Any]]]:
        return [(link.trace_id.hex(), link.span_id.hex(), attribute_dict(link.attributes)) for link in self.span.links]


class OtlpCollector:
    """Accepts `POST /v1/traces` (OTLP/HTTP protobuf) and keeps every decoded request."""

    def __init__(self) -> None:
        self.exports: list[ExportTraceServiceRequest] = []
        self.refused: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = dict(scope["headers"])
        if scope["method"] != "POST" or scope["path"] != "/v1/traces":
            self.refused.append((scope["method"], scope["path"]))
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        if headers.get(b"content-encoding", b"").lower() == b"gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        with self._lock:
            self.exports.append(request)
        answer = ExportTraceServiceResponse().SerializeToString()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/x-protobuf"),
                    (b"content-length", str(len(answer)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    def spans(self) -> list[ExportedSpan]:
        with self._lock:
            exports = list(self.exports)
        found = []
        for export in exports:
            for resource_spans in export.resource_spans:
                resource = attribute_dict(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        found.append(ExportedSpan(resource, scope_spans.scope.name, span))
        return found

    def spans_of_trace(self, trace_id: str) -> list[ExportedSpan]:
        return [span for span in self.spans() if span.trace_id == trace_id]

    def spans_linked_to(self, trace_id: str) -> list[ExportedSpan]:
        return [span for span in self.spans() if any(link[0] == trace_id for link in span.links())]

    def wait_for(
        self, select: Callable[[], list[ExportedSpan]], timeout: float = 5.0, settle: float = 0.3
    ) -> list[ExportedSpan]:
        """Polls until `select` finds spans, then waits `settle` seconds more (a few export
        periods) so that any further spans that should not exist get the chance to arrive."""
        deadline = time.monotonic() + timeout
        while not select():
            assert time.monotonic() < deadline, f"no matching span exported within {timeout} s"
            time.sleep(0.02)
        time.sleep(settle)
        return select()


def start_collector() -> tuple[ServerThread, OtlpCollector]:
    collector = OtlpCollector()
    return serve(collector, log_config=None), collector


# -- log lines as the edge writes them ---------------------------------------------------------------------


@dataclass(frozen=True)
class LogLine:
    record: logging.LogRecord
    text: str

    @property
    def fields(self) -> dict[str, Any]:
        parsed = json.loads(self.text)
        assert isinstance(parsed, dict), self.text
        return parsed


class LineCapture(logging.Handler):
    """Formats each record with the edge's `JsonFormatter` at emit time (where the request's
    context is) and keeps the record with its line."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[LogLine] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(LogLine(record, self.format(record)))

    def matching(self, logger: str | None = None, request_id: str | None = None) -> list[LogLine]:
        found = []
        for line in list(self.lines):
            if logger is not None and line.record.name != logger:
                continue
            if request_id is not None and line.fields.get("request_id") != request_id:
                continue
            found.append(line)
        return found

    def wait_for(self, logger: str, request_id: str, count: int = 1, timeout: float = 5.0) -> list[LogLine]:
        deadline = time.monotonic() + timeout
        while len(found := self.matching(logger, request_id)) < count:
            assert time.monotonic() < deadline, (
                f"{len(found)} of {count} {logger} line(s) for request {request_id} within {timeout} s"
            )
            time.sleep(0.01)
        return found


@contextmanager
def capture_edge_logs() -> Iterator[LineCapture]:
    """Every record of the `edge.*` loggers, `edge.access` enabled down to debug."""
    handler = LineCapture()
    edge_logger = logging.getLogger("edge")
    access_logger = logging.getLogger("edge.access")
    previous_level = access_logger.level
    access_logger.setLevel(logging.DEBUG)
    edge_logger.addHandler(handler)
    try:
        yield handler
    finally:
        edge_logger.removeHandler(handler)
        access_logger.setLevel(previous_level)
