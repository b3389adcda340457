"""Rate limiting with the counters in Redis: shared limits, a failing store, a hanging store.

The Redis is the real one on 127.0.0.1:6379; each test keeps its keys under a prefix of
its own and deletes them afterwards. A dead store is a closed loopback port; a hanging
store is `SilentServer`, a TCP server that accepts and never answers. The headline test
runs two `python -m edge` processes against one Redis and counts every admission.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from edge.policy import Policy, RouteRule
from tests.concerns_support import times_forwarded, unique_path
from tests.processes import ServiceProcess, start_edge_process
from tests.rate_limit_support import (
    REDIS_URL,
    SilentServer,
    collect_records,
    isolated_redis_keys,
    keys_under,
    quotas,
    remaining_and_reset,
    silent_server,
)
from tests.servers import UpstreamApp, closed_port, running_edge

STORE_TIMEOUT = 0.1
# A path whose rule switches rate limiting off: a route that does not need the store.
FREE = Policy(routes=[RouteRule(path="/free", rate_limit="off")])


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=10.0) as http:
        yield http


def envelope_code(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "request_id"}, body
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    return str(body["error"]["code"])


def timed_get(client: httpx.Client, url: str) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = client.get(url)
    return response, time.perf_counter() - started


# -- the limit holds with the counters in Redis ------------------------------------------------------


@pytest.mark.parametrize("strategy", ["moving-window", "fixed-window", "sliding-window-counter"])
def test_limit_holds_with_counters_in_redis(
    strategy: str, upstream_url: str, upstream: UpstreamApp, client: httpx.Client
) -> None:
    path = unique_path()
    with (
        isolated_redis_keys() as (prefix, redis_client),
        running_edge(
            upstream_url,
            rate_limit_default="3/minute",
            rate_limit_strategy=strategy,
            rate_limit_storage_url=REDIS_URL,
            rate_limit_key_prefix=prefix,
        ) as edge,
    ):
        ready = client.get(edge.url + "/_edge/ready")
        responses = [client.get(edge.url + path) for _ in range(5)]
        keys = keys_under(redis_client, prefix)

    assert ready.status_code == 200
    assert ready.json()["checks"]["rate_limit_store"] == "up"
    assert ready.json()["status"] == "ready"
    assert [response.status_code for response in responses] == [200, 200, 200, 429, 429]
    assert [remaining_and_reset(response)["default-1m"][0] for response in responses] == [2, 1, 0, 0, 0]
    for response in responses:
        assert quotas(response) == [("default-1m", 3, 60)]
    for refused in responses[3:]:
        assert envelope_code(refused) == "rate_limited"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert times_forwarded(upstream, path) == 3
    # The counters are in Redis, under this test's prefix, for this client's bucket.
    assert keys, "no key under the test's prefix: the counters are not in Redis"
    assert all("/default/127.0.0.1/3/1/minute" in key for key in keys), keys


def test_moving_window_counts_each_admission_once_in_redis(upstream_url: str, client: httpx.Client) -> None:
    with (
        isolated_redis_keys() as (prefix, redis_client),
        running_edge(
            upstream_url,
            rate_limit_default="4/minute",
            rate_limit_storage_url=REDIS_URL,
            rate_limit_key_prefix=prefix,
        ) as edge,
    ):
        statuses = [client.get(edge.url + unique_path()).status_code for _ in range(6)]
        keys = keys_under(redis_client, prefix)
        assert len(keys) == 1, keys
        entries = redis_client.llen(keys[0])
    assert statuses == [200, 200, 200, 200, 429, 429]
    assert entries == 4  # refused requests take no place in the window


# -- a store that refuses connections ----------------------------------------------------------------------


def test_dead_store_with_fail_open_admits_and_ready_reports_degraded(
    upstream_url: str, upstream: UpstreamApp, client: httpx.Client
) -> None:
    path = unique_path()
    with running_edge(
        upstream_url,
        rate_limit_default="2/minute",
        rate_limit_storage_url=f"redis://127.0.0.1:{closed_port()}/0",
        rate_limit_store_timeout=STORE_TIMEOUT,
    ) as edge:
        assert edge.settings.rate_limit_on_store_error.value == "open"  # the default
        with collect_records("edge.rate_limit") as records:
            responses = [client.get(edge.url + path) for _ in range(6)]
        ready = client.get(edge.url + "/_edge/ready")

    assert [response.status_code for response in responses] == [200] * 6  # over the limit, admitted
    for response in responses:
        assert quotas(response) == [("default-1m", 2, 60)]
        assert "ratelimit" not in response.headers  # nothing is known of the remaining quota
        assert "retry-after" not in response.headers
    assert times_forwarded(upstream, path) == 6
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"upstream": "up", "rate_limit_store": "degraded"}}
    warnings = [r for r in records.snapshot() if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # entering the state, once
    assert warnings[0].levelno == logging.WARNING
    assert "store failing" in warnings[0].getMessage()
    assert "admitting" in warnings[0].getMessage()


def test_dead_store_with_fail_closed_refuses_limited_routes_with_503(
    upstream_url: str, upstream: UpstreamApp, client: httpx.Client
) -> None:
    path = unique_path()
    free_path = unique_path("/free")
    with running_edge(
        upstream_url,
        policy=FREE,
        rate_limit_default="100/minute",
        rate_limit_storage_url=f"redis://127.0.0.1:{closed_port()}/0",
        rate_limit_store_timeout=STORE_TIMEOUT,
        rate_limit_on_store_error="closed",
    ) as edge:
        with collect_records("edge.rate_limit") as records:
            responses = [client.get(edge.url + path) for _ in range(5)]
        free = client.get(edge.url + free_path)
        ready = client.get(edge.url + "/_edge/ready")
        live = client.get(edge.url + "/_edge/live")

    assert [response.status_code for response in responses] == [503] * 5
    for response in responses:
        assert envelope_code(response) == "rate_limit_unavailable"
        assert response.headers["retry-after"] == "1"
        assert response.headers["cache-control"] == "no-store"
    assert times_forwarded(upstream, path) == 0
    assert free.status_code == 200  # a route without a limit does not need the store
    assert times_forwarded(upstream, free_path) == 1
    assert ready.status_code == 503
    assert ready.json() == {"status": "unavailable", "checks": {"upstream": "up", "rate_limit_store": "down"}}
    assert live.status_code == 200
    warnings = [r for r in records.snapshot() if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "store failing" in warnings[0].getMessage()
    assert "refusing" in warnings[0].getMessage()


# -- a store that hangs --------------------------------------------------------------------------------------


def store_traffic(store: SilentServer) -> tuple[int, int]:
    """(connections accepted, bytes read) by the silent store once it has read all that was
    sent to it: two readings several of its polls apart agree."""
    for _ in range(50):
        before = (store.accepted, store.bytes_received)
        time.sleep(0.2)
        if (store.accepted, store.bytes_received) == before:
            return before
    raise AssertionError("the edge kept talking to the store")


def test_hanging_store_costs_the_timeout_until_the_breaker_opens_then_nothing(
    upstream_url: str, upstream: UpstreamApp, client: httpx.Client
) -> None:
    path = unique_path()
    with (
        silent_server() as store,
        running_edge(
            upstream_url,
            rate_limit_default="100/minute",
            rate_limit_storage_url=store.url,
            rate_limit_store_timeout=STORE_TIMEOUT,
        ) as edge,
    ):
        with collect_records("edge.rate_limit") as records:
            slow = [timed_get(client, edge.url + path) for _ in range(3)]
            warnings_after_three = [r for r in records.snapshot() if r.levelno >= logging.WARNING]
            traffic_when_open = store_traffic(store)
            fast = [client.get(edge.url + path) for _ in range(6)]
            traffic_after_fast = store_traffic(store)
            warnings = [r for r in records.snapshot() if r.levelno >= logging.WARNING]
        ready, ready_seconds = timed_get(client, edge.url + "/_edge/ready")

    slow_seconds = [round(seconds, 3) for _, seconds in slow]
    assert [response.status_code for response, _ in slow] + [r.status_code for r in fast] == [200] * 9  # fail-open
    assert times_forwarded(upstream, path) == 9
    # Each of the first three waits for the store's timeout, and not much longer.
    for seconds in slow_seconds:
        assert STORE_TIMEOUT <= seconds < STORE_TIMEOUT + 1.0, slow_seconds
    accepted, bytes_read = traffic_when_open
    assert accepted >= 1, "the edge never connected to the store it was given"
    assert bytes_read > 0, "the edge never sent the store a command"
    # Then the breaker is open: the store is not asked at all, not even connected to.
    assert traffic_after_fast == traffic_when_open
    # The warning is written when the breaker opens, on the third failure.
    assert len(warnings_after_three) == 1, [r.getMessage() for r in warnings_after_three]
    assert len(warnings) == 1
    assert "store failing" in warnings[0].getMessage()
    assert getattr(warnings[0], "error", None) == "TimeoutError"
    assert ready.status_code == 200
    assert ready.json()["checks"]["rate_limit_store"] == "degraded"
    # Readiness asks the hanging store with a timeout of its own (0.5 s), and does not hang.
    assert ready_seconds < 2.0


# -- the headline: two edge processes, one Redis, no over-admission ---------------------------------


def test_two_edge_processes_sharing_redis_admit_exactly_the_limit(
    tmp_path: Path, upstream_url: str, upstream: UpstreamApp
) -> None:
    limit, total = 25, 60
    path = unique_path()
    with isolated_redis_keys() as (prefix, redis_client):
        env = {
            "EDGE_UPSTREAM_URL": upstream_url,
            "EDGE_RATE_LIMIT_STORAGE_URL": REDIS_URL,
            "EDGE_RATE_LIMIT_KEY_PREFIX": prefix,
            "EDGE_RATE_LIMIT_DEFAULT": f"{limit}/minute",
            "EDGE_RATE_LIMIT_STRATEGY": "moving-window",
            # Exactness is the point here, not the fail-open: on a loaded shared machine a
            # store call of 30 concurrent clients can outlast the default 0.5 s.
            "EDGE_RATE_LIMIT_STORE_TIMEOUT": "5",
            "EDGE_LOG_LEVEL": "warning",
        }
        edges: list[ServiceProcess] = []
        try:
            for port in (closed_port(), closed_port()):
                edges.append(start_edge_process(tmp_path, port, {**env, "EDGE_PORT": str(port)}))
            for edge in edges:
                ready = edge.wait_until("/_edge/ready")
                assert ready.json()["checks"]["rate_limit_store"] == "up", ready.text

            def send(number: int) -> httpx.Response:
                edge = edges[number % 2]
                with httpx.Client(trust_env=False, timeout=10.0) as http:
                    return http.get(edge.url + path)

            with ThreadPoolExecutor(max_workers=30) as pool:
                responses = list(pool.map(send, range(total)))
            window_entries = [redis_client.llen(key) for key in keys_under(redis_client, prefix)]
        finally:
            exit_statuses = [edge.stop() for edge in edges]
        outputs = [edge.output() for edge in edges]

    statuses = Counter(response.status_code for response in responses)
    # An admission decided without the store's answer (its call timed out, fail-open) has
    # RateLimit-Policy but no RateLimit field.
    unconsulted = sum(1 for response in responses if "ratelimit" not in response.headers)
    assert statuses == Counter({200: limit, 429: total - limit}), (
        f"{statuses}; admitted without the store's answer: {unconsulted}; "
        f"entries in the Redis window: {window_entries}",
        outputs,
    )
    by_edge = Counter((number % 2, response.status_code) for number, response in enumerate(responses))
    assert by_edge[(0, 200)] + by_edge[(0, 429)] == total // 2
    for response in responses:
        # Every answer came from a store that was asked, not from the fail-open path.
        assert quotas(response) == [("default-1m", limit, 60)]
        remaining, _ = remaining_and_reset(response)["default-1m"]
        assert 0 <= remaining < limit
        if response.status_code == 429:
            assert envelope_code(response) == "rate_limited"
            assert remaining == 0
    assert times_forwarded(upstream, path) == limit
    assert window_entries == [limit]
    assert exit_statuses == [0, 0], outputs
