"""The concurrency cap per host, measured where it matters: at the upstream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from app.outbound import BulkheadFull, Outbound, OutboundSettings
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


@pytest.fixture
def upstream() -> Iterator[ScriptedUpstream]:
    # One server per test: the in-flight high-water mark is per server.
    with scripted_upstream() as server:
        yield server


def test_the_cap_holds_under_200_concurrent_calls(upstream: ScriptedUpstream) -> None:
    upstream.script("/synthesise", then=Reply(200, delay=0.01))

    async def scenario() -> list[int | str]:
        out = outbound(policy(max_concurrency=3, bulkhead_wait=30.0, total_deadline=60.0))
        client = out.client("elevenlabs-like", upstream.url)
        results = await asyncio.gather(*(outcomes(client, "/synthesise", 1) for _ in range(200)))
        await out.aclose()
        return [result for [result] in results]

    assert asyncio.run(scenario()) == [200] * 200
    assert len(upstream.seen_at("/synthesise")) == 200
    assert upstream.max_in_flight == 3


def test_a_call_that_waits_too_long_for_a_slot_is_rejected(upstream: ScriptedUpstream) -> None:
    upstream.script("/busy", then=Reply(200, delay=0.5))
    recorded = telemetry()

    async def scenario() -> tuple[list[int | str], list[BulkheadFull]]:
        out = outbound(policy(max_concurrency=2, bulkhead_wait=0.1), recorded)
        client = out.client("upstream", upstream.url)
        errors: list[BulkheadFull] = []

        async def call() -> int | str:
            try:
                return (await client.get("/busy")).status_code
            except BulkheadFull as error:
                errors.append(error)
                return type(error).__name__

        results = await asyncio.gather(*(call() for _ in range(6)))
        await out.aclose()
        return sorted(results, key=str), errors

    results, errors = asyncio.run(scenario())
    assert results == [200, 200, "BulkheadFull", "BulkheadFull", "BulkheadFull", "BulkheadFull"]
    assert {(error.authority, error.max_concurrency, error.waited) for error in errors} == {
        (upstream.url.removeprefix("http://"), 2, 0.1)
    }
    assert len(upstream.seen_at("/busy")) == 2
    assert upstream.max_in_flight == 2
    host = {("provider", "upstream")}
    assert recorded.metric("app_outbound_rejections_total") == {frozenset(host | {("reason", "bulkhead_full")}): 4}


def test_a_streamed_response_holds_its_slot_until_it_is_closed(upstream: ScriptedUpstream) -> None:
    upstream.script("/stream", then=200)

    async def scenario() -> None:
        out = outbound(policy(max_concurrency=1, bulkhead_wait=0.05))
        client = out.client("upstream", upstream.url)
        async with client.stream("GET", "/stream") as response:
            assert response.status_code == 200
            assert await outcomes(client, "/stream", 1) == ["BulkheadFull"]
        assert await outcomes(client, "/stream", 2) == [200, 200]
        await out.aclose()

    asyncio.run(scenario())


def test_failed_and_cancelled_calls_give_their_slots_back(upstream: ScriptedUpstream) -> None:
    # Only the client side is checked here: the upstream notices a cancelled call's
    # disconnect a moment after the freed slot's next request has arrived.
    slow = Reply(200, delay=0.3)
    upstream.script("/slots", 500, 500, Reply(delay=HANG), slow, slow, then=200)

    async def scenario() -> None:
        out = outbound(policy(max_concurrency=1, bulkhead_wait=2.0, minimum_calls=8))
        client = out.client("upstream", upstream.url)
        assert await outcomes(client, "/slots", 2) == [500, 500]
        hanging = asyncio.ensure_future(client.get("/slots"))
        await wait_for_requests(upstream, "/slots", 3)
        waiting = asyncio.ensure_future(client.get("/slots"))  # queued behind the hanging call
        await asyncio.sleep(0.05)
        hanging.cancel()  # cancelled in flight
        started = time.monotonic()
        assert (await waiting).status_code == 200  # took the freed slot
        assert time.monotonic() - started < 1.5
        holder = asyncio.ensure_future(client.get("/slots"))
        await wait_for_requests(upstream, "/slots", 5)
        waiter = asyncio.ensure_future(client.get("/slots"))
        await asyncio.sleep(0.05)
        waiter.cancel()  # cancelled while still waiting for a slot
        await asyncio.gather(hanging, waiter, return_exceptions=True)
        assert (await holder).status_code == 200
        # With a slot leaked, this would wait 2 s and be refused.
        assert await outcomes(client, "/slots", 1) == [200]
        await out.aclose()

    asyncio.run(scenario())
    assert len(upstream.seen_at("/slots")) == 6  # the cancelled waiter never reached it


def test_a_zero_wait_bulkhead_rejects_at_once(upstream: ScriptedUpstream) -> None:
    upstream.script("/no-queue", then=Reply(200, delay=0.3))

    async def scenario() -> list[int | str]:
        out = outbound(policy(max_concurrency=1, bulkhead_wait=0.0))
        client = out.client("upstream", upstream.url)
        first = asyncio.ensure_future(client.get("/no-queue"))
        await asyncio.sleep(0.05)
        second = await outcomes(client, "/no-queue", 1)
        results: list[int | str] = [(await first).status_code, *second]
        await out.aclose()
        return results

    assert asyncio.run(scenario()) == [200, "BulkheadFull"]


def test_a_response_read_in_full_by_the_inner_transport_frees_its_slot_at_once() -> None:
    # httpx.MockTransport hands back responses already read: they have no body to close.
    async def scenario() -> list[int]:
        out = Outbound(
            OutboundSettings(default=policy(max_concurrency=1, bulkhead_wait=0.0)),
            inner=httpx.MockTransport(lambda request: httpx.Response(204)),
        )
        client = out.client("mocked", "http://mocked.invalid")
        statuses = [(await client.get("/")).status_code for _ in range(3)]
        await out.aclose()
        return statuses

    assert asyncio.run(scenario()) == [204, 204, 204]
