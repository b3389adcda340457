"""The access log and the JSON log lines: one line per request, and every line written while
a request is handled carries its request id and trace id.

The lines are captured with a handler on the `edge` loggers that formats each record with
the edge's own `JsonFormatter` when it is emitted - on the edge's thread, inside the
request's context, exactly where the stdout handler of a deployed edge formats it - and
the JSON text is what is checked. The last test runs `python -m edge` and reads its stdout.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.logs import JsonFormatter
from tests.processes import edge_process
from tests.servers import RawUpstream, RunningEdge, closed_port, running_edge
from tests.telemetry_support import LineCapture, capture_edge_logs, upstream_traceparent

ISO_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
ACCESS_FIELDS = {
    "time",
    "level",
    "logger",
    "message",
    "request_id",
    "trace_id",
    "span_id",
    "method",
    "path",
    "status",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "client",
    "upstream_status",
    "rate_limit",
}


@pytest.fixture
def logs() -> Iterator[LineCapture]:
    with capture_edge_logs() as capture:
        yield capture


def request(
    url: str,
    *,
    method: str = "GET",
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=10.0) as client:
        return client.request(method, url, content=content, headers=headers or {})


def access_line(logs: LineCapture, response: httpx.Response) -> dict[str, Any]:
    """The one access line of the request that got `response`."""
    request_id = response.headers["x-request-id"]
    lines = logs.wait_for("edge.access", request_id)
    time.sleep(0.05)  # a second line would be a defect: give it the chance to show
    lines = logs.matching("edge.access", request_id)
    assert len(lines) == 1, [line.text for line in lines]
    return lines[0].fields


# -- the fields ----------------------------------------------------------------------------------------------


def test_one_line_per_request_with_every_field(edge: RunningEdge, logs: LineCapture) -> None:
    body = b"b" * 12_345
    response = request(f"{edge.url}/echo?token=secret", method="POST", content=body, headers={"x-test": "fields"})
    assert response.status_code == 200
    upstream = upstream_traceparent(response.json())

    request_id = response.headers["x-request-id"]
    [captured] = logs.wait_for("edge.access", request_id)
    time.sleep(0.05)
    assert len(logs.matching("edge.access", request_id)) == 1
    assert "secret" not in captured.text
    assert captured.record.levelno == logging.INFO
    line = captured.fields
    assert set(line) == ACCESS_FIELDS, line
    assert ISO_UTC.fullmatch(line["time"]), line["time"]
    assert line["level"] == "info"
    assert line["logger"] == "edge.access"
    assert line["request_id"] == request_id
    assert line["trace_id"] == upstream.trace_id
    assert line["span_id"] == upstream.parent_id
    assert line["method"] == "POST"
    assert line["path"] == "/echo"
    assert line["status"] == 200
    assert line["bytes_in"] == len(body)
    assert line["bytes_out"] == len(response.content)
    assert isinstance(line["duration_ms"], float | int)
    assert line["duration_ms"] > 0
    assert line["client"] == "127.0.0.1"
    assert line["upstream_status"] == 200
    assert line["rate_limit"] is None


def test_get_without_body_counts_zero_bytes_in(edge: RunningEdge, logs: LineCapture) -> None:
    response = request(f"{edge.url}/status/201")
    assert response.status_code == 201
    line = access_line(logs, response)
    assert (line["method"], line["path"], line["status"]) == ("GET", "/status/201", 201)
    assert line["bytes_in"] == 0
    assert line["bytes_out"] == 2
    assert line["upstream_status"] == 201


def test_client_is_resolved_through_trusted_proxies(upstream_url: str, logs: LineCapture) -> None:
    with running_edge(upstream_url, trusted_proxies=[ip_network("127.0.0.0/8")]) as edge:
        response = request(f"{edge.url}/echo", headers={"x-forwarded-for": "203.0.113.9"})
        assert response.status_code == 200
        line = access_line(logs, response)
    assert line["client"] == "203.0.113.9"


@pytest.mark.parametrize(
    ("target", "size", "min_duration_ms"),
    [("/bytes/1000000", 1_000_000, 0), ("/sse?n=3&interval=0.2", None, 400)],
    ids=["bytes", "sse"],
)
def test_streamed_response_is_logged_once_when_it_ends(
    edge: RunningEdge, logs: LineCapture, target: str, size: int | None, min_duration_ms: float
) -> None:
    response = request(f"{edge.url}{target}")
    assert response.status_code == 200
    line = access_line(logs, response)
    assert line["bytes_out"] == len(response.content)
    if size is not None:
        assert line["bytes_out"] == size
    assert line["duration_ms"] >= min_duration_ms
    assert line["upstream_status"] == 200


def test_edge_made_502_has_no_upstream_status(logs: LineCapture) -> None:
    with running_edge(f"http://127.0.0.1:{closed_port()}") as edge:
        response = request(f"{edge.url}/down")
        assert response.status_code == 502
        line = access_line(logs, response)
    assert line["status"] == 502
    assert line["upstream_status"] is None
    assert line["bytes_out"] == len(response.content) > 0


def test_edge_own_404_has_no_upstream_status(edge: RunningEdge, logs: LineCapture) -> None:
    response = request(f"{edge.url}/_edge/nope")
    assert response.status_code == 404
    line = access_line(logs, response)
    assert line["path"] == "/_edge/nope"
    assert line["status"] == 404
    assert line["upstream_status"] is None


def test_rate_limit_decision_allowed(upstream_url: str, logs: LineCapture) -> None:
    with running_edge(upstream_url, rate_limit_default="100/minute") as edge:
        response = request(f"{edge.url}/echo")
        assert response.status_code == 200
        line = access_line(logs, response)
    assert line["rate_limit"] == "allowed"
    assert line["upstream_status"] == 200


def test_rate_limit_decision_limited(upstream_url: str, logs: LineCapture) -> None:
    with running_edge(upstream_url, rate_limit_default="1/minute") as edge:
        first = request(f"{edge.url}/echo")
        second = request(f"{edge.url}/echo")
        assert (first.status_code, second.status_code) == (200, 429)
        first_line = access_line(logs, first)
        second_line = access_line(logs, second)
    assert first_line["rate_limit"] == "allowed"
    assert second_line["rate_limit"] == "limited"
    assert second_line["status"] == 429
    assert second_line["upstream_status"] is None


def test_client_gone_before_any_response_is_499(edge: RunningEdge, logs: LineCapture) -> None:
    request_id = f"gone-{uuid.uuid4().hex}"
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as sock:
        sock.sendall(f"GET /slow?delay=3 HTTP/1.1\r\nHost: edge\r\nX-Request-ID: {request_id}\r\n\r\n".encode())
        time.sleep(0.3)  # the edge has forwarded it; the upstream has not answered
    [captured] = logs.wait_for("edge.access", request_id, timeout=2.5)
    line = captured.fields
    assert line["path"] == "/slow"
    assert line["status"] == 499
    assert line["upstream_status"] is None
    assert line["bytes_out"] == 0


def test_edge_probes_at_debug_requests_at_info(edge: RunningEdge, logs: LineCapture) -> None:
    probe = request(f"{edge.url}/_edge/live")
    proxied = request(f"{edge.url}/echo")
    assert (probe.status_code, proxied.status_code) == (200, 200)
    [probe_line] = logs.wait_for("edge.access", probe.headers["x-request-id"])
    [proxied_line] = logs.wait_for("edge.access", proxied.headers["x-request-id"])
    assert probe_line.record.levelno == logging.DEBUG
    assert probe_line.fields["level"] == "debug"
    assert probe_line.fields["path"] == "/_edge/live"
    assert proxied_line.record.levelno == logging.INFO
    assert proxied_line.fields["level"] == "info"


def test_access_log_off_writes_no_line(upstream_url: str, logs: LineCapture) -> None:
    with running_edge(upstream_url, access_log=False) as edge:
        responses = [request(f"{edge.url}/echo"), request(f"{edge.url}/_edge/live")]
        time.sleep(0.3)
    assert [response.status_code for response in responses] == [200, 200]
    for response in responses:
        assert logs.matching("edge.access", response.headers["x-request-id"]) == []


# -- request id and trace id on every line ---------------------------------------------------------------


def test_lines_logged_during_a_request_carry_its_ids(
    raw_edge: RunningEdge, raw_upstream: RawUpstream, logs: LineCapture
) -> None:
    request_id = f"cut-{uuid.uuid4().hex}"
    with (
        httpx.Client(trust_env=False, timeout=5.0) as client,
        client.stream("GET", f"{raw_edge.url}/die-mid-body", headers={"x-request-id": request_id}) as response,
    ):
        assert response.status_code == 200
        with pytest.raises(httpx.TransportError):
            response.read()

    [warning] = logs.wait_for("edge.proxy", request_id)
    [access] = logs.wait_for("edge.access", request_id)
    assert warning.record.levelno == logging.WARNING
    assert "cut short" in warning.fields["message"]
    assert warning.fields["request_id"] == access.fields["request_id"] == request_id
    assert re.fullmatch(r"[0-9a-f]{32}", warning.fields["trace_id"])
    assert warning.fields["trace_id"] == access.fields["trace_id"]
    assert warning.fields["span_id"] == access.fields["span_id"]
    assert access.fields["status"] == 200
    assert access.fields["upstream_status"] == 200


# -- the formatter ------------------------------------------------------------------------------------------


def format_line(record: logging.LogRecord) -> dict[str, Any]:
    text = JsonFormatter().format(record)
    assert "\n" not in text
    parsed = json.loads(text)
    assert isinstance(parsed, dict)
    return parsed


def test_json_formatter_writes_utc_iso_time_with_milliseconds() -> None:
    formatter = JsonFormatter()
    # One formatter caches the text up to the second: moving between seconds must not reuse it.
    for created, expected in [
        (1_700_000_000.25, "2023-11-14T22:13:20.250Z"),
        (1_700_000_061.5, "2023-11-14T22:14:21.500Z"),
        (1_700_000_000.75, "2023-11-14T22:13:20.750Z"),
        (0.0, "1970-01-01T00:00:00.000Z"),
    ]:
        record = logging.makeLogRecord({"name": "tests", "msg": "at a time", "created": created})
        assert json.loads(formatter.format(record))["time"] == expected

    now = time.time()
    line = format_line(logging.makeLogRecord({"name": "tests", "msg": "now", "created": now}))
    shown = datetime.strptime(line["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert -1e-6 <= now - shown.timestamp() < 0.0011  # milliseconds, truncated


def test_json_formatter_keeps_extra_fields_and_exception_text() -> None:
    logger = logging.getLogger("tests.json_formatter")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger.addHandler(handler)
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            logger.error(
                "failed %s of %d",
                "one",
                2,
                exc_info=True,
                extra={"user_field": "kept", "count": 7, "nested": {"a": [1, 2]}, "odd": object()},
            )
        logger.warning("plain")
    finally:
        logger.removeHandler(handler)

    failed, plain = (format_line(record) for record in records)
    assert failed["level"] == "error"
    assert failed["logger"] == "tests.json_formatter"
    assert failed["message"] == "failed one of 2"
    assert ISO_UTC.fullmatch(failed["time"])
    assert failed["user_field"] == "kept"
    assert failed["count"] == 7
    assert failed["nested"] == {"a": [1, 2]}
    assert failed["odd"].startswith("<object object")
    assert failed["exception"].startswith("Traceback (most recent call last)")
    assert failed["exception"].endswith("ValueError: boom")
    # Outside any request: no request id, no trace id; no exception key without one.
    assert "request_id" not in failed
    assert "trace_id" not in failed
    assert set(plain) == {"time", "level", "logger", "message"}


# -- the process's log level --------------------------------------------------------------------------------


def test_log_level_warning_writes_no_info_lines(tmp_path: Path, raw_upstream: RawUpstream) -> None:
    port = closed_port()
    env = {"EDGE_PORT": str(port), "EDGE_UPSTREAM_URL": raw_upstream.url, "EDGE_LOG_LEVEL": "warning"}
    request_id = f"warn-{uuid.uuid4().hex}"
    with edge_process(tmp_path, port, env) as edge, httpx.Client(trust_env=False, timeout=5.0) as client:
        assert client.get(f"{edge.url}/ok").status_code == 200  # an info access line
        # And a warning, which must get through: the proxy's line for a response cut short.
        with (
            client.stream("GET", f"{edge.url}/die-mid-body", headers={"x-request-id": request_id}) as response,
            pytest.raises(httpx.TransportError),
        ):
            response.read()
        time.sleep(0.2)
        status = edge.stop()
        stdout, stderr = edge.stdout(), edge.stderr()

    entries = []
    for line in stdout.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"a stdout line is not JSON: {line!r}")
        assert isinstance(entry, dict), line
        entries.append(entry)
    assert status == 0, stderr
    assert [entry for entry in entries if entry["level"] in ("info", "debug")] == []
    warnings = [entry for entry in entries if entry.get("request_id") == request_id]
    assert [(entry["level"], entry["logger"]) for entry in warnings] == [("warning", "edge.proxy")]
