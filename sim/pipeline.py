"""What every simulated provider call goes through, whichever provider it imitates.

1. the call is counted for its route (`GET /_sim/calls`), with the status it got;
2. the provider checks the key, and ElevenLabs its concurrency limit (the route's code);
3. the body is read whole, up to a cap (over it: drained, then 413);
4. the call waits SIM_LATENCY_MS + the route's latency + the fault's `delay_ms`, and stops
   early if the client hangs up meanwhile (counted as status 499, as nginx logs it);
5. a queued fault answers instead of the provider, or, with status 200, lets it answer
   (late, or cut after `abort_after_bytes`); a `hang` fault never answers, and the call
   waits until the client hangs up (499);
6. the provider works out its answer and takes the latency profile's time for it
   (`Call.pause`, sim/latency.py), or streams it piece by piece (`PacedStream`).

The body is read before waiting so that a client disconnect is noticed during the wait:
once the body is consumed, the next `receive()` only returns on a disconnect.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

RouteName = Literal["chat", "transcribe", "speech"]
ROUTES: tuple[RouteName, ...] = get_args(RouteName)

# nginx's code for "the client closed the connection before the answer": the call is
# counted with it when the client gave up during a simulated delay.
CLIENT_CLOSED = 499
CHATS_KEPT = 200


class SimulatedAbort(Exception):
    """Raised after part of a response was sent, so that the server drops the connection."""


class FaultSpec(BaseModel):
    """One fault, as `POST /_sim/faults` takes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    route: RouteName
    status: int = Field(503, ge=200, le=599)
    # The next `times` calls; -1 (or omitted): every call until the faults are cleared.
    times: int = Field(-1, ge=-1)
    delay_ms: int = Field(0, ge=0, le=600_000)
    # Status 200 only: send the response head and this many body bytes, then cut.
    abort_after_bytes: int | None = Field(None, ge=0)
    # Never answer: the call waits until the client gives up.
    hang: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> FaultSpec:
        if self.hang and self.model_fields_set & {"status", "delay_ms", "abort_after_bytes"}:
            raise ValueError("a hang never answers: it takes no status, delay_ms or abort_after_bytes")
        if self.times == 0:
            raise ValueError("times must be a positive count, or -1 for every call until cleared")
        if self.status != 200 and not 400 <= self.status <= 599:
            raise ValueError("status must be 200 (answer normally, late or cut) or an error, 400-599")
        if self.abort_after_bytes is not None and self.status != 200:
            raise ValueError("abort_after_bytes needs status 200: it cuts a normal answer short")
        return self


@dataclass
class QueuedFault:
    id: int
    spec: FaultSpec
    remaining: int  # -1: until cleared

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, **self.spec.model_dump(), "remaining": self.remaining}


@dataclass
class RouteStats:
    received: int = 0
    faulted: int = 0
    statuses: Counter[int] = field(default_factory=Counter)

    def describe(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "faulted": self.faulted,
            "statuses": {str(status): count for status, count in sorted(self.statuses.items())},
        }


class SimState:
    """Faults, per-route latency and call counts: everything the `/_sim/` API changes.

    One instance per application; the server runs on one event loop, so no locks.
    """

    def __init__(self, base_latency_ms: int) -> None:
        self.base_latency_ms = base_latency_ms
        self.route_latency_ms: dict[RouteName, int] = dict.fromkeys(ROUTES, 0)
        self.faults: dict[RouteName, deque[QueuedFault]] = {route: deque() for route in ROUTES}
        self.stats: dict[RouteName, RouteStats] = {route: RouteStats() for route in ROUTES}
        # What the latest chat completions were given (sim/replies.py's `context`).
        self.chats: deque[dict[str, Any]] = deque(maxlen=CHATS_KEPT)
        self._ids = itertools.count(1)

    def add_fault(self, spec: FaultSpec) -> QueuedFault:
        fault = QueuedFault(next(self._ids), spec, spec.times)
        self.faults[spec.route].append(fault)
        return fault

    def take_fault(self, route: RouteName) -> FaultSpec | None:
        """The fault for this call, if any: the oldest queued for the route, used up once."""
        queue = self.faults[route]
        if not queue:
            return None
        fault = queue[0]
        if fault.remaining > 0:
            fault.remaining -= 1
            if fault.remaining == 0:
                queue.popleft()
        return fault.spec

    def clear_faults(self) -> None:
        for queue in self.faults.values():
            queue.clear()

    def list_faults(self) -> list[dict[str, Any]]:
        return [fault.describe() for route in ROUTES for fault in self.faults[route]]

    def reset_calls(self) -> None:
        self.stats = {route: RouteStats() for route in ROUTES}
        self.chats.clear()

    def latency_seconds(self, route: RouteName) -> float:
        return (self.base_latency_ms + self.route_latency_ms[route]) / 1000


@dataclass
class Call:
    """One provider call under way: its route, the fault it drew and its body."""

    route: RouteName
    request: Request
    state: SimState
    fault: FaultSpec | None = None
    body: bytes = b""

    async def read_body(self, limit: int) -> bool:
        """Reads the whole body; False when it is longer than `limit` (the rest is drained
        unread, so the client gets its 413 instead of a reset connection)."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in self.request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
        if size > limit:
            return False
        self.body = b"".join(chunks)
        return True

    async def wait(self) -> bool:
        """The simulated latency and the fault's delay; draws the fault for this call.

        False when the client hung up while waiting: the caller answers nothing useful.
        """
        self.fault = self.state.take_fault(self.route)
        delay = self.state.latency_seconds(self.route)
        if self.fault is not None:
            self.state.stats[self.route].faulted += 1
            if self.fault.hang:
                return await sleep_unless_disconnected(self.request.receive, None)
            delay += self.fault.delay_ms / 1000
        if delay <= 0:
            return True
        return await sleep_unless_disconnected(self.request.receive, delay)

    async def pause(self, seconds: float) -> bool:
        """The provider's own working time (the latency profile's); False when the client
        hung up meanwhile."""
        if seconds <= 0:
            return True
        return await sleep_unless_disconnected(self.request.receive, seconds)

    @property
    def cut(self) -> int | None:
        """The body bytes a fault lets through before the connection drops, if it cuts."""
        return None if self.fault is None else self.fault.abort_after_bytes

    @property
    def error_status(self) -> int | None:
        """The status a fault answers with instead of the provider, if it does."""
        if self.fault is None or self.fault.status == 200:
            return None
        return self.fault.status

    def finish(self, response: Response, chunked: bool = False) -> Response:
        """Cuts the response short when the fault says so; `chunked` sends its body without
        a content-length, as the streaming routes do."""
        if self.cut is not None:
            return AbortingResponse(response, self.cut, chunked)
        return response


async def sleep_unless_disconnected(receive: Receive, seconds: float | None) -> bool:
    """False as soon as the client hangs up; True after `seconds` (None: never)."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    done, _ = await asyncio.wait({watcher}, timeout=seconds)
    if done:
        return False
    watcher.cancel()
    return True


class AbortingResponse(Response):
    """The head of `inner` (with its full content-length, or chunked), the first `cut`
    bytes of its body, then a dropped connection: a provider dying mid-answer."""

    def __init__(self, inner: Response, cut: int, chunked: bool) -> None:
        super().__init__(inner.body, inner.status_code)
        self.cut = cut
        self.raw_headers = [
            (name, value) for name, value in inner.raw_headers if not (chunked and name == b"content-length")
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = bytes(self.body)
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": body[: self.cut], "more_body": True})
        raise SimulatedAbort(f"connection cut after {min(self.cut, len(body))} of {len(body)} bytes")


Endpoint = Callable[[Call], Awaitable[Response]]


def provider_endpoint(route: RouteName, state: SimState, handler: Endpoint) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint that counts the call and the status it was answered with; a
    client that leaves mid-body counts as 499, like one that leaves during a delay."""

    async def endpoint(request: Request) -> Response:
        call = Call(route, request, state)
        stats = state.stats[route]
        stats.received += 1
        try:
            response = await handler(call)
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            response = Response(status_code=CLIENT_CLOSED)
        stats.statuses[response.status_code] += 1
        return response

    return endpoint


class PacedStream(StreamingResponse):
    """A chunked body sent piece by piece, each `(at, data)` piece `at` seconds after the
    stream starts (as a provider sends what it has made so far); with `cut`, the first
    `cut` bytes only, then a dropped connection, as `AbortingResponse`. A client that hangs
    up stops the stream (Starlette listens for the disconnect). `on_close` runs however
    the stream ends."""

    def __init__(
        self,
        pieces: Sequence[tuple[float, bytes]],
        headers: dict[str, str],
        cut: int | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(paced(pieces), headers=headers)
        self.cut = cut
        self.on_close = on_close

    async def stream_response(self, send: Send) -> None:
        if self.cut is None:
            await super().stream_response(send)
            return
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        sent = 0
        async for chunk in self.body_iterator:
            assert isinstance(chunk, bytes)
            if sent + len(chunk) > self.cut:
                await send({"type": "http.response.body", "body": chunk[: self.cut - sent], "more_body": True})
                sent = self.cut
                break
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            sent += len(chunk)
        raise SimulatedAbort(f"stream cut after {sent} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.on_close is not None:
                self.on_close()


async def paced(pieces: Sequence[tuple[float, bytes]]) -> AsyncIterator[bytes]:
    """Each piece at its time after the first is asked for; on time however long sending
    the earlier ones took, since the times are kept from one start."""
    started = time.monotonic()
    for at, data in pieces:
        delay = started + at - time.monotonic()
        # sleep(0) between pieces that are due: other calls are served meanwhile.
        await asyncio.sleep(max(0.0, delay))
        yield data
