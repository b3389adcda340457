"""Retries, Retry-After, 429 blocks, the retry budget and deadlines, against real servers."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from email.utils import formatdate

import httpx
import pytest

from app.outbound import (
    DEADLINE_EXTENSION,
    IDEMPOTENT_EXTENSION,
    RETRY_AFTER_EXTENSION,
    DeadlineExceeded,
    HostRateLimited,
)
from app.outbound.retry import retry_after_seconds
from tests.outbound_support import (
    HANG,
    Reply,
    ScriptedUpstream,
    outbound,
    outcomes,
    policy,
    scripted_upstream,
    telemetry,
)
from tests.servers import RawUpstream, closed_port


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with scripted_upstream() as server:
        yield server


def gaps(upstream: ScriptedUpstream, path: str) -> list[float]:
    arrivals = [request.at for request in upstream.seen_at(path)]
    return [later - earlier for earlier, later in itertools.pairwise(arrivals)]


@pytest.mark.parametrize(
    ("header", "value", "at_least"),
    [
        ("retry-after-ms", "300", 0.3),
        ("retry-after", "1", 1.0),
        # An HTTP date has whole seconds: two seconds ahead is more than one from now.
        ("retry-after", "date+2", 1.0),
    ],
)
def test_a_429_retry_after_is_waited_for_then_the_call_is_retried(
    upstream: ScriptedUpstream, header: str, value: str, at_least: float
) -> None:
    path = f"/retry-after-{header}-{value}"
    if value == "date+2":
        value = formatdate(time.time() + 2, usegmt=True)
    upstream.script(path, Reply(429, headers=((header, value),)), then=200)

    async def scenario() -> int:
        out = outbound(policy(max_retries=1))
        response = await out.client("upstream", upstream.url).post(path, content=b"{}")
        await out.aclose()
        return response.status_code

    assert asyncio.run(scenario()) == 200  # a POST too: a 429 is an explicit refusal
    [gap] = gaps(upstream, path)
    assert at_least <= gap < at_least + 1.5


def test_a_429_blocks_the_host_until_retry_after_without_counting_as_a_failure(
    upstream: ScriptedUpstream,
) -> None:
    upstream.script("/quota", then=Reply(429, headers=(("retry-after-ms", "300"),)))
    recorded = telemetry()

    async def scenario() -> None:
        out = outbound(policy(minimum_calls=2, window_size=2), recorded)
        client = out.client("upstream", upstream.url)
        assert await outcomes(client, "/quota", 1) == [429]
        with pytest.raises(HostRateLimited) as blocked:
            await client.get("/quota")
        assert 0.1 < blocked.value.retry_after <= 0.3
        assert blocked.value.authority == upstream.url.removeprefix("http://")
        for _ in range(4):
            await asyncio.sleep(0.31)
            assert await outcomes(client, "/quota", 1) == [429]
        assert out.named_states() == {"upstream": "closed"}  # five 429s, no failure
        await out.aclose()

    asyncio.run(scenario())
    assert len(upstream.seen_at("/quota")) == 5
    host = {("provider", "upstream")}
    assert recorded.metric("app_outbound_rejections_total") == {frozenset(host | {("reason", "rate_limited")}): 1}
    assert recorded.metric("app_outbound_calls_total") == {
        frozenset(host | {("outcome", "rate_limited")}): 5,
        frozenset(host | {("outcome", "rejected")}): 1,
    }


def test_retry_after_is_capped(upstream: ScriptedUpstream) -> None:
    upstream.script("/long-wait", Reply(429, headers=(("retry-after", "3600"),)), then=200)

    async def scenario() -> None:
        out = outbound(policy(retry_after_cap=0.3))
        client = out.client("upstream", upstream.url)
        assert await outcomes(client, "/long-wait", 2) == [429, "HostRateLimited"]
        await asyncio.sleep(0.35)
        assert await outcomes(client, "/long-wait", 1) == [200]
        await out.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (503, (("retry-after", "3600"),), 5.0),  # capped by the policy
        (429, (("retry-after-ms", "1500"),), 1.5),
        (500, (("retry-after", "2"),), 2.0),
        (503, (), None),
        (404, (("retry-after", "2"),), None),  # not a failure: nothing to wait for
    ],
)
def test_a_returned_failure_carries_the_capped_wait_it_asked_for(
    upstream: ScriptedUpstream, status: int, headers: tuple[tuple[str, str], ...], expected: float | None
) -> None:
    path = f"/asks-to-wait-{status}-{len(headers)}-{expected}"
    upstream.script(path, then=Reply(status, headers=headers))

    async def scenario() -> float | None:
        out = outbound(policy(retry_after_cap=5.0, max_retries=0))
        response = await out.client("upstream", upstream.url).post(path, content=b"{}")
        await out.aclose()
        assert response.status_code == status
        wait: float | None = response.extensions.get(RETRY_AFTER_EXTENSION)
        return wait

    assert asyncio.run(scenario()) == expected


def test_a_429_whose_wait_overruns_the_deadline_is_returned_at_once(upstream: ScriptedUpstream) -> None:
    upstream.script("/too-long", Reply(429, headers=(("retry-after", "5"),)), then=200)

    async def scenario() -> tuple[int, float]:
        out = outbound(policy(max_retries=2, total_deadline=2.0, attempt_timeout=1.0, retry_after_cap=10.0))
        started = time.monotonic()
        response = await out.client("upstream", upstream.url).get("/too-long")
        elapsed = time.monotonic() - started
        await out.aclose()
        return response.status_code, elapsed

    status, elapsed = asyncio.run(scenario())
    assert status == 429
    assert elapsed < 1.0
    assert len(upstream.seen_at("/too-long")) == 1


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 498])
def test_a_post_is_not_repeated_after_a_failure_status(upstream: ScriptedUpstream, status: int) -> None:
    path = f"/post-{status}"
    upstream.script(path, status, then=200)

    async def scenario() -> int:
        out = outbound(policy(max_retries=3))
        response = await out.client("upstream", upstream.url).post(path, content=b'{"text":"bill me once"}')
        await out.aclose()
        return response.status_code

    assert asyncio.run(scenario()) == status
    assert len(upstream.seen_at(path)) == 1


def test_a_post_is_repeated_after_a_503_with_retry_after(upstream: ScriptedUpstream) -> None:
    upstream.script("/busy", Reply(503, headers=(("retry-after-ms", "100"),)), then=200)

    async def scenario() -> int:
        out = outbound(policy(max_retries=1))
        response = await out.client("upstream", upstream.url).post("/busy", content=b"{}")
        await out.aclose()
        return response.status_code

    assert asyncio.run(scenario()) == 200
    [gap] = gaps(upstream, "/busy")
    assert gap >= 0.1


def test_an_idempotent_call_is_retried_and_each_attempt_has_its_span(upstream: ScriptedUpstream) -> None:
    upstream.script("/flaky", 500, 503, then=200)
    recorded = telemetry()

    async def scenario() -> int:
        out = outbound(policy(max_retries=2), recorded)
        response = await out.client("upstream", upstream.url).get("/flaky")
        await out.aclose()
        return response.status_code

    assert asyncio.run(scenario()) == 200
    spans = [span for span in recorded.finished_spans() if span.name == "GET"]
    assert [(span.attributes or {}).get("http.request.resend_count") for span in spans] == [None, 1, 2]
    assert [(span.attributes or {})["http.response.status_code"] for span in spans] == [500, 503, 200]
    seen = [request.headers["traceparent"] for request in upstream.seen_at("/flaky")]
    assert seen == [
        f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-{span.context.trace_flags:02x}" for span in spans
    ]
    host = {("provider", "upstream")}
    assert recorded.metric("app_outbound_retries_total") == {frozenset(host): 2}
    assert recorded.metric("app_outbound_calls_total") == {frozenset(host | {("outcome", "success")}): 1}


def test_a_failed_response_is_returned_unchanged_once_retries_are_spent(upstream: ScriptedUpstream) -> None:
    upstream.script("/down", then=Reply(502, body=b'{"error":"bad gateway"}'))

    async def scenario() -> tuple[int, bytes]:
        out = outbound(policy(max_retries=2, minimum_calls=8))
        response = await out.client("upstream", upstream.url).get("/down")
        await out.aclose()
        return response.status_code, response.content

    assert asyncio.run(scenario()) == (502, b'{"error":"bad gateway"}')
    assert len(upstream.seen_at("/down")) == 3


def test_a_post_is_repeated_when_it_was_never_sent() -> None:
    recorded = telemetry()
    base_url = f"http://127.0.0.1:{closed_port()}"

    async def scenario() -> None:
        out = outbound(policy(max_retries=2), recorded)
        with pytest.raises(httpx.ConnectError):
            await out.client("upstream", base_url).post("/transcribe", content=b"audio")
        await out.aclose()

    asyncio.run(scenario())
    spans = [span for span in recorded.finished_spans() if span.name == "POST"]
    assert [(span.attributes or {}).get("http.request.resend_count") for span in spans] == [None, 1, 2]
    assert [(span.attributes or {})["error.type"] for span in spans] == ["ConnectError"] * 3


@pytest.mark.parametrize(("method", "attempts"), [("POST", 1), ("GET", 3)])
def test_after_a_read_timeout_only_an_idempotent_call_is_repeated(
    upstream: ScriptedUpstream, method: str, attempts: int
) -> None:
    path = f"/slow-{method}"
    upstream.script(path, then=Reply(delay=HANG))

    async def scenario() -> None:
        out = outbound(policy(max_retries=2, attempt_timeout=0.2, minimum_calls=8))
        with pytest.raises(httpx.ReadTimeout):
            await out.client("upstream", upstream.url).request(method, path)
        await out.aclose()

    asyncio.run(scenario())
    assert len(upstream.seen_at(path)) == attempts


@pytest.mark.parametrize(
    ("policy_name", "extensions", "attempts"),
    [
        ("upstream", {IDEMPOTENT_EXTENSION: True}, 2),  # e.g. a search sent as a POST
        ("qdrant", {}, 2),  # every Qdrant call is idempotent
        ("qdrant", {IDEMPOTENT_EXTENSION: False}, 1),
    ],
)
def test_idempotency_can_be_declared_per_call_or_per_policy(
    upstream: ScriptedUpstream, policy_name: str, extensions: dict[str, bool], attempts: int
) -> None:
    path = f"/declared-{policy_name}-{extensions}"
    upstream.script(path, 500, then=200)

    async def scenario() -> int:
        out = outbound(policy(max_retries=1), qdrant=policy(max_retries=1, all_methods_idempotent=True))
        client = out.client(policy_name, upstream.url)
        response = await client.post(path, content=b"{}", extensions=extensions)
        await out.aclose()
        return response.status_code

    assert asyncio.run(scenario()) == (200 if attempts == 2 else 500)
    assert len(upstream.seen_at(path)) == attempts


def test_a_body_that_cannot_be_sent_twice_is_not_retried(upstream: ScriptedUpstream) -> None:
    upstream.script("/one-shot", 500, then=200)

    async def audio() -> AsyncIterator[bytes]:
        yield b"chunk of audio"

    async def scenario() -> int:
        out = outbound(policy(max_retries=2))
        response = await out.client("upstream", upstream.url).put("/one-shot", content=audio())
        await out.aclose()
        return response.status_code

    assert asyncio.run(scenario()) == 500
    assert len(upstream.seen_at("/one-shot")) == 1


@pytest.mark.parametrize("path", ["/die-mid-body", "/die-mid-chunked"])
def test_nothing_is_repeated_after_the_first_byte_of_a_stream(path: str) -> None:
    raw = RawUpstream().start()

    async def scenario() -> dict[str, str]:
        out = outbound(policy(max_retries=3, minimum_calls=2, window_size=2, failure_rate_threshold=0.5))
        client = out.client("upstream", raw.url)
        async with client.stream("GET", path) as response:
            assert response.status_code == 200
            with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                async for _ in response.aiter_bytes():
                    pass
        states = out.named_states()
        await out.aclose()
        return states

    try:
        states = asyncio.run(scenario())
        assert raw.requests_seen == [path.encode()]
    finally:
        raw.stop()
    # The head counted as a success, the broken body as a failure: 1 of 2 trips at 50 %.
    assert states == {"upstream": "open"}


def test_retries_stay_within_the_budget(upstream: ScriptedUpstream) -> None:
    upstream.script("/outage", then=503)
    recorded = telemetry()

    async def scenario() -> list[int | str]:
        # The breaker is kept out of the way (it would stop the outage's calls first).
        out = outbound(
            policy(max_retries=2, minimum_calls=1000, window_size=1000, retry_budget_ratio=0.2, retry_budget_min=3),
            recorded,
        )
        results = await outcomes(out.client("upstream", upstream.url), "/outage", 50)
        await out.aclose()
        return results

    assert asyncio.run(scenario()) == [503] * 50
    # Without the budget: 150 requests. With it: 3 retries at first (the minimum), then one
    # whenever 20 % of the calls so far exceeds the retries so far - 10 for 50 calls.
    assert len(upstream.seen_at("/outage")) == 60
    host = {("provider", "upstream")}
    assert recorded.metric("app_outbound_retries_total") == {frozenset(host): 10}
    assert recorded.metric("app_outbound_retry_budget_exhausted_total") == {frozenset(host): 49}


def test_the_deadline_shrinks_across_retries_and_bounds_the_call(upstream: ScriptedUpstream) -> None:
    upstream.script("/hangs", then=Reply(delay=HANG))

    async def scenario() -> tuple[float, dict[str, str]]:
        out = outbound(
            policy(
                attempt_timeout=0.4,
                total_deadline=1.0,
                max_retries=5,
                minimum_calls=3,
                window_size=3,
                failure_rate_threshold=1.0,
            )
        )
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as exceeded:
            await out.client("upstream", upstream.url).get("/hangs")
        elapsed = time.monotonic() - started
        assert isinstance(exceeded.value, httpx.TimeoutException)
        assert exceeded.value.deadline == 1.0
        states = out.named_states()
        await out.aclose()
        return elapsed, states

    elapsed, states = asyncio.run(scenario())
    # Attempts of 0.4 s, 0.4 s, then the 0.2 s left: three, not six.
    assert len(upstream.seen_at("/hangs")) == 3
    assert 1.0 <= elapsed < 1.8
    # Two full-length timeouts are failures; the attempt the deadline cut short is not (3 of
    # 3 would have tripped it).
    assert states == {"upstream": "closed"}


def test_a_call_can_set_its_own_deadline(upstream: ScriptedUpstream) -> None:
    upstream.script("/own-deadline", then=Reply(delay=HANG))

    async def scenario() -> float:
        out = outbound(policy(attempt_timeout=2.0, total_deadline=5.0))
        client = out.client("upstream", upstream.url)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await client.get("/own-deadline", extensions={DEADLINE_EXTENSION: 0.3})
        elapsed = time.monotonic() - started
        with pytest.raises(ValueError, match=r"outbound\.deadline must be a positive number"):
            await client.get("/own-deadline", extensions={DEADLINE_EXTENSION: 0})
        await out.aclose()
        return elapsed

    assert 0.3 <= asyncio.run(scenario()) < 1.2
    assert len(upstream.seen_at("/own-deadline")) == 1


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the precise one wins
        ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),
        ({"retry-after": "-3"}, 0.0),
        ({"retry-after": "86400"}, 60.0),  # capped
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # in the past
        ({"retry-after": "tomorrow"}, None),
        ({"retry-after": "nan"}, None),
        ({}, None),
    ],
)
def test_retry_after_forms(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_seconds(httpx.Headers(headers), cap=60.0) == expected


def test_retry_after_as_an_http_date() -> None:
    wait = retry_after_seconds(httpx.Headers({"retry-after": formatdate(time.time() + 30, usegmt=True)}), 60.0)
    assert wait is not None
    assert 28.0 < wait <= 30.0
