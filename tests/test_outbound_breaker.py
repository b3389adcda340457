"""The breaker per authority, driven through the shared transport against real servers that
fail on purpose: when it trips, how it rejects, how it probes, and what it ignores."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import httpx
import pytest
from opentelemetry import trace

from app.metrics import BreakerStates
from app.outbound import BreakerOpen, Outbound
from tests.outbound_support import (
    HANG,
    Reply,
    ScriptedUpstream,
    outbound,
    outcomes,
    policy,
    scripted_upstream,
    telemetry,
    wait_for_requests,
)
from tests.servers import RawUpstream, closed_port


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with scripted_upstream() as server:
        yield server


@pytest.fixture(scope="module")
def raw() -> Iterator[RawUpstream]:
    server = RawUpstream().start()
    yield server
    server.stop()


def authority(url: str) -> str:
    return url.removeprefix("http://")


async def wait_for_state(out: Outbound, state: str) -> None:
    deadline = time.monotonic() + 5
    while out.named_states()["upstream"] != state:
        assert time.monotonic() < deadline, f"still {out.named_states()} after 5 s"
        await asyncio.sleep(0.01)


def test_trips_on_the_failure_rate_only_once_the_minimum_calls_are_seen(upstream: ScriptedUpstream) -> None:
    upstream.script("/minimum", 500, 500, 500, then=200)

    async def scenario() -> None:
        out = outbound(policy(minimum_calls=4, window_size=8, failure_rate_threshold=0.5))
        client = out.client("upstream", upstream.url)
        assert await outcomes(client, "/minimum", 3) == [500, 500, 500]
        assert out.named_states() == {"upstream": "closed"}  # 100 % failures, but 3 < 4 calls
        # The 4th call completes the minimum: 3 failures in 4 calls is over the threshold.
        assert await outcomes(client, "/minimum", 2) == [200, "BreakerOpen"]
        assert out.named_states() == {"upstream": "open"}
        await out.aclose()

    asyncio.run(scenario())
    assert len(upstream.seen_at("/minimum")) == 4


def test_trips_on_interleaved_failures_that_never_run_consecutively(upstream: ScriptedUpstream) -> None:
    # A consecutive-failure breaker (the circuitbreaker package's) never trips on this.
    upstream.script("/interleaved", 200, 500, 200, 500, 200, 500, then=200)

    async def scenario() -> list[int | str]:
        out = outbound(policy(minimum_calls=6, window_size=6, failure_rate_threshold=0.5))
        results = await outcomes(out.client("upstream", upstream.url), "/interleaved", 7)
        await out.aclose()
        return results

    assert asyncio.run(scenario()) == [200, 500, 200, 500, 200, 500, "BreakerOpen"]


def test_outcomes_older_than_the_window_no_longer_count(upstream: ScriptedUpstream) -> None:
    upstream.script("/aged", 500, 500, 500, 500, then=200)

    async def scenario() -> None:
        out = outbound(policy(minimum_calls=4, window_size=8, window_seconds=0.6, attempt_timeout=0.3))
        client = out.client("upstream", upstream.url)
        assert await outcomes(client, "/aged", 3) == [500, 500, 500]
        await asyncio.sleep(0.7)
        # The three old failures have aged out: one failure in one call is under the minimum.
        assert await outcomes(client, "/aged", 1) == [500]
        assert out.named_states() == {"upstream": "closed"}
        await out.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 498])
def test_failure_statuses_count_and_are_returned_not_raised(upstream: ScriptedUpstream, status: int) -> None:
    path = f"/failing-{status}"
    upstream.script(path, then=status)

    async def scenario() -> list[int | str]:
        out = outbound(policy(minimum_calls=2, window_size=2, failure_rate_threshold=1.0))
        results = await outcomes(out.client("upstream", upstream.url), path, 3)
        await out.aclose()
        return results

    assert asyncio.run(scenario()) == [status, status, "BreakerOpen"]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_client_errors_are_not_failures(upstream: ScriptedUpstream, status: int) -> None:
    path = f"/client-error-{status}"
    upstream.script(path, then=status)

    async def scenario() -> tuple[list[int | str], dict[str, str]]:
        out = outbound(policy(minimum_calls=2, window_size=2, failure_rate_threshold=0.5))
        results = await outcomes(out.client("upstream", upstream.url), path, 5)
        states = out.named_states()
        await out.aclose()
        return results, states

    assert asyncio.run(scenario()) == ([status] * 5, {"upstream": "closed"})


@pytest.mark.parametrize(
    ("target", "raised"),
    [
        ("closed-port", "ConnectError"),
        ("reset-before-response", "RemoteProtocolError"),
        ("close-before-response", "RemoteProtocolError"),
        ("hang", "ReadTimeout"),
    ],
)
def test_connection_errors_and_timeouts_are_failures(raw: RawUpstream, target: str, raised: str) -> None:
    base_url = f"http://127.0.0.1:{closed_port()}" if target == "closed-port" else raw.url

    async def scenario() -> list[int | str]:
        out = outbound(policy(minimum_calls=2, window_size=2, failure_rate_threshold=1.0, attempt_timeout=0.3))
        results = await outcomes(out.client("upstream", base_url), f"/{target}", 3)
        await out.aclose()
        return results

    results = asyncio.run(scenario())
    # A reset may surface as a read error or as "disconnected without a response".
    if target == "reset-before-response" and results[0] == "ReadError":
        raised = "ReadError"
    assert results == [raised, raised, "BreakerOpen"]


def test_rejects_while_open_with_the_remaining_open_time(upstream: ScriptedUpstream) -> None:
    upstream.script("/open", 500, 500, then=200)

    async def scenario() -> list[BreakerOpen]:
        out = outbound(policy(minimum_calls=2, window_size=2, open_seconds=30.0))
        client = out.client("upstream", upstream.url)
        assert await outcomes(client, "/open", 2) == [500, 500]
        errors: list[BreakerOpen] = []
        for _ in range(400):
            try:
                await client.get("/open")
            except BreakerOpen as error:
                errors.append(error)
        await out.aclose()
        return errors

    errors = asyncio.run(scenario())
    # What a rejection costs is measured in bench/transport_bench.py (docs/resilience.md#benchmark).
    assert len(errors) == 400
    assert len(upstream.seen_at("/open")) == 2
    assert {error.authority for error in errors} == {authority(upstream.url)}
    assert 29.0 < errors[-1].retry_after <= errors[0].retry_after <= 30.0


def test_a_successful_probe_closes_the_breaker(upstream: ScriptedUpstream) -> None:
    upstream.script("/recovers", 500, 500, then=200)

    async def scenario() -> None:
        out = outbound(policy(minimum_calls=2, window_size=2, open_seconds=0.3))
        client = out.client("upstream", upstream.url)
        assert await outcomes(client, "/recovers", 3) == [500, 500, "BreakerOpen"]
        await wait_for_state(out, "half_open")
        assert await outcomes(client, "/recovers", 3) == [200, 200, 200]
        assert out.named_states() == {"upstream": "closed"}
        await out.aclose()

    asyncio.run(scenario())
    assert len(upstream.seen_at("/recovers")) == 5


def test_a_failed_probe_reopens_the_breaker_for_a_fresh_open_period(upstream: ScriptedUpstream) -> None:
    upstream.script("/relapses", 500, 500, 503, then=200)

    async def scenario() -> BreakerOpen:
        out = outbound(policy(minimum_calls=2, window_size=2, open_seconds=0.5))
        client = out.client("upstream", upstream.url)
        assert await outcomes(client, "/relapses", 2) == [500, 500]
        await wait_for_state(out, "half_open")
        assert await outcomes(client, "/relapses", 1) == [503]
        assert out.named_states() == {"upstream": "open"}
        with pytest.raises(BreakerOpen) as rejected:
            await client.get("/relapses")
        await out.aclose()
        return rejected.value

    rejected = asyncio.run(scenario())
    assert 0.2 < rejected.retry_after <= 0.5  # a fresh 0.5 s, exactly (not rounded up to 1)
    assert len(upstream.seen_at("/relapses")) == 3


@pytest.mark.parametrize("probes", [1, 2])
def test_half_open_admits_only_its_probes_and_decides_from_them(upstream: ScriptedUpstream, probes: int) -> None:
    path = f"/probes-{probes}"
    upstream.script(path, 500, 500, then=Reply(200, delay=0.4))

    async def scenario() -> tuple[list[int | str], list[float], dict[str, str]]:
        out = outbound(policy(minimum_calls=2, window_size=2, open_seconds=0.2, half_open_probes=probes))
        client = out.client("upstream", upstream.url)
        assert await outcomes(client, path, 2) == [500, 500]
        await wait_for_state(out, "half_open")
        probe_calls = [asyncio.ensure_future(client.get(path)) for _ in range(probes)]
        await wait_for_requests(upstream, path, 2 + probes)
        rejected: list[float] = []
        for _ in range(5):
            try:
                await client.get(path)
            except BreakerOpen as error:
                rejected.append(error.retry_after)
        results: list[int | str] = [(await call).status_code for call in probe_calls]
        states = out.named_states()
        results += await outcomes(client, path, 1)
        await out.aclose()
        return results, rejected, states

    results, rejected, states = asyncio.run(scenario())
    assert rejected == [0.0] * 5  # the probes are in flight: nothing is left open to wait for
    assert results == [200] * (probes + 1)
    assert states == {"upstream": "closed"}
    assert len(upstream.seen_at(path)) == 2 + probes + 1


def test_cancelled_calls_neither_trip_nor_reset_a_closed_breaker(upstream: ScriptedUpstream) -> None:
    upstream.script("/cancel-closed", 500, 500, 500, *[Reply(delay=HANG)] * 5, 500, then=200)

    async def scenario() -> None:
        out = outbound(policy(minimum_calls=4, window_size=8, failure_rate_threshold=0.5))
        client = out.client("upstream", upstream.url)
        assert await outcomes(client, "/cancel-closed", 3) == [500, 500, 500]
        hanging = [asyncio.ensure_future(client.get("/cancel-closed")) for _ in range(5)]
        await wait_for_requests(upstream, "/cancel-closed", 8)
        for call in hanging:
            call.cancel()
        await asyncio.gather(*hanging, return_exceptions=True)
        # As failures they would have tripped it (8 of 8); as successes they would have diluted
        # the rate (3 of 8) or, as the package does, reset the count.
        assert out.named_states() == {"upstream": "closed"}
        assert await outcomes(client, "/cancel-closed", 2) == [500, "BreakerOpen"]  # 4 of 4
        await out.aclose()

    asyncio.run(scenario())


def test_a_cancelled_probe_leaves_the_breaker_half_open_for_the_next(upstream: ScriptedUpstream) -> None:
    upstream.script("/cancel-probe", 500, 500, Reply(delay=HANG), then=200)

    async def scenario() -> None:
        out = outbound(policy(minimum_calls=2, window_size=2, open_seconds=0.2))
        client = out.client("upstream", upstream.url)
        assert await outcomes(client, "/cancel-probe", 2) == [500, 500]
        await wait_for_state(out, "half_open")
        probe = asyncio.ensure_future(client.get("/cancel-probe"))
        await wait_for_requests(upstream, "/cancel-probe", 3)
        probe.cancel()
        await asyncio.gather(probe, return_exceptions=True)
        assert out.named_states() == {"upstream": "half_open"}
        assert await outcomes(client, "/cancel-probe", 1) == [200]  # admitted as the probe
        assert out.named_states() == {"upstream": "closed"}
        await out.aclose()

    asyncio.run(scenario())


def test_each_authority_has_its_own_breaker(upstream: ScriptedUpstream, raw: RawUpstream) -> None:
    upstream.script("/neighbour", then=200)

    async def scenario() -> None:
        out = outbound(policy(minimum_calls=2, window_size=2))
        failing = out.client("failing", raw.url)
        healthy = out.client("healthy", upstream.url)
        assert await outcomes(failing, "/close-before-response", 3) == [
            "RemoteProtocolError",
            "RemoteProtocolError",
            "BreakerOpen",
        ]
        assert await outcomes(healthy, "/neighbour", 2) == [200, 200]
        assert out.named_states() == {"failing": "open", "healthy": "closed"}
        await out.aclose()

    asyncio.run(scenario())


def test_every_state_change_is_logged_once(upstream: ScriptedUpstream, caplog: pytest.LogCaptureFixture) -> None:
    upstream.script("/logged", 500, 500, 500, then=200)
    caplog.set_level(logging.INFO, logger="app.outbound")

    async def scenario() -> None:
        out = outbound(policy(minimum_calls=2, window_size=2, open_seconds=0.2))
        client = out.client("upstream", upstream.url)
        assert await outcomes(client, "/logged", 3) == [500, 500, "BreakerOpen"]
        await asyncio.sleep(0.25)
        assert await outcomes(client, "/logged", 2) == [500, "BreakerOpen"]
        await asyncio.sleep(0.25)
        assert await outcomes(client, "/logged", 2) == [200, 200]
        await out.aclose()

    asyncio.run(scenario())
    changes = [
        (record.levelname, record.__dict__["from_state"], record.__dict__["to_state"])
        for record in caplog.records
        if record.name == "app.outbound"
    ]
    assert changes == [
        ("WARNING", "closed", "open"),
        ("INFO", "open", "half_open"),
        ("WARNING", "half_open", "open"),
        ("INFO", "open", "half_open"),
        ("INFO", "half_open", "closed"),
    ]
    first = next(record for record in caplog.records if record.name == "app.outbound")
    assert first.__dict__["authority"] == authority(upstream.url)
    assert first.__dict__["provider"] == "upstream"
    assert first.__dict__["failure_rate"] == 1.0
    assert first.__dict__["calls_in_window"] == 2
    assert first.__dict__["last_failure"] == "HTTP 500"


def test_a_rejection_is_recorded_on_the_callers_span_and_counted(upstream: ScriptedUpstream) -> None:
    upstream.script("/observed", 500, 500, then=200)
    recorded = telemetry()

    async def scenario() -> None:
        out = outbound(policy(minimum_calls=2, window_size=2, open_seconds=30.0), recorded)
        client = out.client("upstream", upstream.url)
        recorded.registry.register(BreakerStates(out.named_states))  # as the app does
        assert await outcomes(client, "/observed", 2) == [500, 500]
        tracer = recorded.tracer_provider.get_tracer("caller")
        with tracer.start_as_current_span("handle turn"), pytest.raises(BreakerOpen):
            await client.get("/observed")
        with pytest.raises(BreakerOpen):
            await client.get("/observed")
        await out.aclose()

    asyncio.run(scenario())
    caller = next(span for span in recorded.finished_spans() if span.name == "handle turn")
    assert [event.name for event in caller.events] == ["outbound.rejected"]
    attributes = dict(caller.events[0].attributes or {})
    assert attributes["outbound.authority"] == authority(upstream.url)
    assert attributes["outbound.rejection.reason"] == "breaker_open"
    assert 29.0 < float(attributes["outbound.retry_after"]) <= 30.0  # type: ignore[arg-type]
    # Rejected calls made no attempt, so they have no client span of their own.
    assert [span.kind for span in recorded.finished_spans() if span.name == "GET"] == [trace.SpanKind.CLIENT] * 2

    host = {("provider", "upstream")}
    assert recorded.metric("app_outbound_rejections_total") == {frozenset(host | {("reason", "breaker_open")}): 2}
    assert recorded.metric("app_breaker_state") == {
        frozenset(host | {("state", "closed")}): 0,
        frozenset(host | {("state", "half_open")}): 0,
        frozenset(host | {("state", "open")}): 1,
    }
    assert recorded.metric("app_outbound_calls_total") == {
        frozenset(host | {("outcome", "failure")}): 2,
        frozenset(host | {("outcome", "rejected")}): 2,
    }
    assert recorded.metric("app_breaker_transitions_total") == {frozenset(host | {("state", "open")}): 1}
    assert recorded.metric("app_provider_responses_total") == {frozenset(host | {("status", "500")}): 2}


def test_errors_of_our_own_making_are_not_failures(upstream: ScriptedUpstream) -> None:
    # An illegal header or an unsupported scheme is the caller's bug, not the upstream's.
    upstream.script("/own-fault", then=200)

    async def scenario() -> tuple[dict[str, str], list[int | str]]:
        out = outbound(policy(minimum_calls=1, window_size=1))
        client = out.client("upstream", upstream.url)
        for _ in range(3):
            with pytest.raises(httpx.LocalProtocolError):
                await client.get("/own-fault", headers={"x-transcript": "line\r\ninjected: yes"})
        with pytest.raises(httpx.UnsupportedProtocol):
            await client.get("ftp://127.0.0.1:1/file")
        states = out.named_states()
        results = await outcomes(client, "/own-fault", 1)
        await out.aclose()
        return states, results

    assert asyncio.run(scenario()) == ({"upstream": "closed"}, [200])
