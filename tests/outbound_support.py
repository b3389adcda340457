"""Upstreams that fail on purpose, and telemetry capture, for the outbound transport tests.

`ScriptedUpstream` is a real HTTP server (uvicorn on a loopback thread, see
`tests.servers`): each path answers from a script of replies - statuses, headers, delays,
hangs - and then with its fallback reply, and records every request it saw and how many
it was serving at once. Connection resets and half-sent bodies come from
`tests.servers.RawUpstream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from starlette.types import Receive, Scope, Send

from app.outbound import HostPolicy, Outbound, OutboundSettings
from app.outbound.telemetry import OutboundMetrics
from tests.servers import ServerThread, serve

HANG = 3600.0


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0  # before the head; HANG waits until the client goes away
    body: bytes = b'{"ok":true}'


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    at: float  # time.monotonic() when the request arrived


@dataclass
class ScriptedUpstream:
    scripts: dict[str, deque[Reply]] = field(default_factory=dict)
    fallbacks: dict[str, Reply] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    server: ServerThread | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def script(self, path: str, *replies: Reply | int, then: Reply | int = 200) -> None:
        """`path` answers `replies` in order, then `then` for ever after."""
        self.scripts[path] = deque(reply if isinstance(reply, Reply) else Reply(reply) for reply in replies)
        self.fallbacks[path] = then if isinstance(then, Reply) else Reply(then)

    def seen_at(self, path: str) -> list[Seen]:
        return [request for request in self.seen if request.path == path]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        path: str = scope["path"]
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        self.seen.append(Seen(scope["method"], path, headers, time.monotonic()))
        script = self.scripts.get(path)
        reply = script.popleft() if script else self.fallbacks.get(path, Reply())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            while (await receive()).get("more_body"):
                pass
            if reply.delay and await _client_left_within(receive, reply.delay):
                return
            response_headers = [(b"content-length", str(len(reply.body)).encode())]
            response_headers += [(key.encode(), value.encode()) for key, value in reply.headers]
            await send({"type": "http.response.start", "status": reply.status, "headers": response_headers})
            await send({"type": "http.response.body", "body": reply.body})
        finally:
            self.in_flight -= 1


async def _client_left_within(receive: Receive, seconds: float) -> bool:
    async def disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    try:
        await asyncio.wait_for(disconnect(), seconds)
    except TimeoutError:
        return False
    return True


@contextlib.contextmanager
def scripted_upstream() -> Iterator[ScriptedUpstream]:
    upstream = ScriptedUpstream()
    upstream.server = serve(upstream, timeout_keep_alive=30)
    try:
        yield upstream
    finally:
        upstream.server.stop()


# -- policies and the factory under test --------------------------------------------------------------------


def policy(**overrides: Any) -> HostPolicy:
    """A policy on a test's time scale: no retries, a breaker that needs 4 calls in a window
    of 8, open for 0.3 s. Tests override what they exercise."""
    values: dict[str, Any] = {
        "attempt_timeout": 2.0,
        "total_deadline": 5.0,
        "connect_timeout": 1.0,
        "max_concurrency": 50,
        "bulkhead_wait": 5.0,
        "failure_rate_threshold": 0.5,
        "minimum_calls": 4,
        "window_size": 8,
        "window_seconds": 60.0,
        "open_seconds": 0.3,
        "half_open_probes": 1,
        "max_retries": 0,
        "backoff_base": 0.001,
        "backoff_max": 0.005,
        "retry_budget_ratio": 0.2,
        "retry_budget_min": 3,
        "retry_after_cap": 5.0,
    }
    values.update(overrides)
    values["connect_timeout"] = min(values["connect_timeout"], values["attempt_timeout"])
    return HostPolicy(**values)


@dataclass
class Telemetry:
    spans: InMemorySpanExporter
    tracer_provider: TracerProvider
    registry: CollectorRegistry

    def finished_spans(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def metric(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        """The samples named `name` (`app_outbound_calls_total`), by their label sets."""
        return {
            frozenset(sample.labels.items()): sample.value
            for family in self.registry.collect()
            for sample in family.samples
            if sample.name == name
        }


def telemetry() -> Telemetry:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    return Telemetry(spans, tracer_provider, CollectorRegistry())


def outbound(host_policy: HostPolicy, recorded: Telemetry | None = None, **named: HostPolicy) -> Outbound:
    """An Outbound whose `default` policy is `host_policy`, with real telemetry if given."""
    settings = OutboundSettings.model_validate({"default": host_policy, **named})
    if recorded is None:
        return Outbound(settings)
    return Outbound(
        settings,
        tracer=recorded.tracer_provider.get_tracer("test"),
        metrics=OutboundMetrics.build(recorded.registry),
    )


async def wait_for_requests(upstream: ScriptedUpstream, path: str, count: int) -> None:
    """Until `path` has seen `count` requests (the server runs on another thread)."""
    deadline = time.monotonic() + 5
    while len(upstream.seen_at(path)) < count:
        assert time.monotonic() < deadline, f"{path} saw {len(upstream.seen_at(path))} requests"
        await asyncio.sleep(0.005)


async def outcomes(client: httpx.AsyncClient, path: str, count: int) -> list[int | str]:
    """Status codes (or exception class names) of `count` sequential GETs."""
    results: list[int | str] = []
    for _ in range(count):
        try:
            results.append((await client.get(path)).status_code)
        except httpx.HTTPError as error:
            results.append(type(error).__name__)
    return results
