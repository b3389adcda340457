"""Rate limiting at the edge, with the in-process store: limits, headers, buckets, modes.

Every test runs the real edge on a loopback socket (`tests.servers.running_edge`) in front
of the session's real upstream, with rate limiting switched on by the test. The IETF
fields (`RateLimit`, `RateLimit-Policy`) are parsed as RFC 8941 structured fields, never
substring-matched. Each test uses request paths of its own, so the upstream's record tells
exactly which of its requests were forwarded.
"""

from __future__ import annotations

import json
import logging
import random
import uuid
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from edge.policy import Policy, load_policy
from tests.concerns_support import times_forwarded, unique_path
from tests.rate_limit_support import (
    collect_records,
    field_list,
    has_no_rate_limit_fields,
    parse_sf_list,
    quotas,
    remaining_and_reset,
)
from tests.servers import RunningEdge, UpstreamApp, running_edge, wait_until

TRUST_LOOPBACK = [ip_network("127.0.0.0/8")]

POLICY_TOML = """
[[routes]]
name = "voice-turns"
path = "/api/v1/sessions/*/turns"
methods = ["POST"]
rate_limit = "2/minute;5/day"

[[routes]]
path = "/public"
rate_limit = "off"
"""

POLICY_YAML = """
routes:
  - name: voice-turns
    path: /api/v1/sessions/*/turns
    methods: [POST]
    rate_limit: 2/minute;5/day
  - path: /public
    rate_limit: "off"
"""


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=5.0) as http:
        yield http


def write_policy(tmp_path: Path, kind: str) -> Policy:
    path = tmp_path / f"policy.{kind}"
    path.write_text(POLICY_TOML if kind == "toml" else POLICY_YAML)
    return load_policy(path)


def assert_rate_limited(response: httpx.Response) -> dict[str, object]:
    """The 429 envelope, whose message says the seconds its `Retry-After` says; returns its
    `error` object."""
    assert response.status_code == 429, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "request_id"}, body
    assert error["code"] == "rate_limited"
    assert error["message"] == f"Too many requests. Retry in {seconds(retry_after(response))}."
    assert error["request_id"] == response.headers["x-request-id"]
    return dict(error)


def seconds(count: int) -> str:
    return "1 second" if count == 1 else f"{count} seconds"


def retry_after(response: httpx.Response) -> int:
    values = response.headers.get_list("retry-after")
    assert len(values) == 1, values
    assert values[0].isdigit(), f"Retry-After is not whole seconds: {values[0]!r}"
    return int(values[0])


# -- 1. the default limit and the 429 -------------------------------------------------------------------


def test_fourth_request_over_the_default_limit_is_refused_with_429_and_never_forwarded(
    upstream_url: str, upstream: UpstreamApp, client: httpx.Client
) -> None:
    path = unique_path()
    with running_edge(upstream_url, rate_limit_default="3/minute") as edge:
        admitted = [client.get(edge.url + path) for _ in range(3)]
        refused = client.get(edge.url + path)

    for response in admitted:
        assert response.status_code == 200
        assert quotas(response) == [("default-1m", 3, 60)]
        assert "retry-after" not in response.headers
    remaining = [remaining_and_reset(response)["default-1m"] for response in admitted]
    assert [r for r, _ in remaining] == [2, 1, 0]
    for _, reset in remaining:
        assert 59 <= reset <= 60  # the moving window frees up a minute after the first hit

    error = assert_rate_limited(refused)
    assert error["code"] == "rate_limited"
    assert refused.headers["cache-control"] == "no-store"
    assert quotas(refused) == [("default-1m", 3, 60)]
    assert field_list(refused, "ratelimit-policy") == [("default-1m", {"q": 3, "w": 60})]
    limit = remaining_and_reset(refused)
    assert list(limit) == ["default-1m"]
    left, reset = limit["default-1m"]
    assert left == 0
    assert 1 <= retry_after(refused) <= 60
    assert retry_after(refused) == max(1, reset)

    assert times_forwarded(upstream, path) == 3


def test_every_later_request_is_refused_too_and_none_is_forwarded(
    upstream_url: str, upstream: UpstreamApp, client: httpx.Client
) -> None:
    path = unique_path()
    with running_edge(upstream_url, rate_limit_default="2/minute") as edge:
        statuses = [client.get(edge.url + path).status_code for _ in range(6)]
        other_method = client.post(edge.url + path, content=b"x")
    assert statuses == [200, 200, 429, 429, 429, 429]
    assert_rate_limited(other_method)  # the default bucket is per client, not per method
    assert times_forwarded(upstream, path) == 2


# -- 2. per-route policies from a policy file ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["toml", "yaml"])
def test_route_rule_with_two_quotas_has_its_own_bucket(
    tmp_path: Path, kind: str, upstream_url: str, upstream: UpstreamApp, client: httpx.Client
) -> None:
    policy = write_policy(tmp_path, kind)
    session = uuid.uuid4().hex
    turns = f"/api/v1/sessions/{session}/turns"
    other_session_turns = f"/api/v1/sessions/{uuid.uuid4().hex}/turns"
    with running_edge(upstream_url, policy=policy, rate_limit_default="3/minute") as edge:
        first = client.post(edge.url + turns, content=b"audio")
        get_same_path = client.get(edge.url + turns)
        second = client.post(edge.url + other_session_turns, content=b"audio")
        third = client.post(edge.url + turns, content=b"audio")
        get_after = client.get(edge.url + turns)

    both_quotas = [("voice-turns-1m", 2, 60), ("voice-turns-1d", 5, 86400)]
    assert first.status_code == 200
    assert quotas(first) == both_quotas
    assert field_list(first, "ratelimit-policy") == [
        ("voice-turns-1m", {"q": 2, "w": 60}),
        ("voice-turns-1d", {"q": 5, "w": 86400}),
    ]
    first_limits = remaining_and_reset(first)
    assert list(first_limits) == ["voice-turns-1m", "voice-turns-1d"]
    assert first_limits["voice-turns-1m"][0] == 1
    assert first_limits["voice-turns-1d"][0] == 4
    assert 59 <= first_limits["voice-turns-1m"][1] <= 60
    assert 86399 <= first_limits["voice-turns-1d"][1] <= 86400

    # GET is not in the rule's methods: the default limit, in the default's own bucket.
    assert get_same_path.status_code == 200
    assert quotas(get_same_path) == [("default-1m", 3, 60)]
    assert {name: r for name, (r, _) in remaining_and_reset(get_same_path).items()} == {"default-1m": 2}

    # The glob covers every session: one bucket for the rule (and the client).
    assert second.status_code == 200
    second_limits = remaining_and_reset(second)
    assert (second_limits["voice-turns-1m"][0], second_limits["voice-turns-1d"][0]) == (0, 3)

    assert_rate_limited(third)
    assert quotas(third) == both_quotas
    assert remaining_and_reset(third)["voice-turns-1m"][0] == 0
    assert 1 <= retry_after(third) <= 60

    # The refused POST took nothing from the default bucket.
    assert get_after.status_code == 200
    assert {name: r for name, (r, _) in remaining_and_reset(get_after).items()} == {"default-1m": 1}

    posts = [r for r in upstream.record.requests if r.method == "POST"]
    assert sum(1 for r in posts if r.raw_path == turns.encode()) == 1
    assert sum(1 for r in posts if r.raw_path == other_session_turns.encode()) == 1


@pytest.mark.parametrize("kind", ["toml", "yaml"])
def test_rule_with_rate_limit_off_leaves_its_paths_unlimited(
    tmp_path: Path, kind: str, upstream_url: str, upstream: UpstreamApp, client: httpx.Client
) -> None:
    policy = write_policy(tmp_path, kind)
    public = unique_path("/public")
    limited = unique_path("/publicity")  # not under /public: a prefix ends at a segment boundary
    with running_edge(upstream_url, policy=policy, rate_limit_default="2/minute") as edge:
        unlimited_responses = [client.get(edge.url + public) for _ in range(6)]
        limited_statuses = [client.get(edge.url + limited).status_code for _ in range(3)]
    assert [response.status_code for response in unlimited_responses] == [200] * 6
    for response in unlimited_responses:
        assert has_no_rate_limit_fields(response), dict(response.headers)
    assert times_forwarded(upstream, public) == 6
    assert limited_statuses == [200, 200, 429]


def test_edge_endpoints_are_never_limited_and_use_no_quota(upstream_url: str, client: httpx.Client) -> None:
    path = unique_path()
    with running_edge(upstream_url, rate_limit_default="2/minute") as edge:
        probes = [client.get(edge.url + probe) for probe in ["/_edge/live", "/_edge/ready"] * 5]
        after = client.get(edge.url + path)
    assert [probe.status_code for probe in probes] == [200] * 10
    for probe in probes:
        assert has_no_rate_limit_fields(probe), dict(probe.headers)
    assert after.status_code == 200
    assert {name: r for name, (r, _) in remaining_and_reset(after).items()} == {"default-1m": 1}


# -- 3. whose bucket ---------------------------------------------------------------------------------------


def random_address() -> str:
    return ".".join(str(random.randint(1, 254)) for _ in range(4))


def test_forged_x_forwarded_for_does_not_change_the_bucket_without_trusted_proxies(
    upstream_url: str, client: httpx.Client
) -> None:
    path = unique_path()
    with running_edge(upstream_url, rate_limit_default="3/minute") as edge:
        responses = [client.get(edge.url + path, headers={"x-forwarded-for": random_address()}) for _ in range(4)]
    assert [response.status_code for response in responses] == [200, 200, 200, 429]
    assert [remaining_and_reset(response)["default-1m"][0] for response in responses] == [2, 1, 0, 0]


def test_clients_behind_a_trusted_proxy_get_buckets_of_their_own(upstream_url: str, client: httpx.Client) -> None:
    path = unique_path()
    with running_edge(upstream_url, rate_limit_default="3/minute", trusted_proxies=TRUST_LOOPBACK) as edge:

        def get(forwarded_for: str) -> httpx.Response:
            return client.get(edge.url + path, headers={"x-forwarded-for": forwarded_for})

        first_client = [get("203.0.113.1") for _ in range(4)]
        second_client = get("203.0.113.2")
        # A client cannot escape its bucket by prepending an address of its choosing.
        first_client_forging = get("198.51.100.9, 203.0.113.1")
    assert [response.status_code for response in first_client] == [200, 200, 200, 429]
    assert [remaining_and_reset(response)["default-1m"][0] for response in first_client] == [2, 1, 0, 0]
    assert second_client.status_code == 200
    assert remaining_and_reset(second_client)["default-1m"][0] == 2
    assert_rate_limited(first_client_forging)


@pytest.mark.parametrize("key_part", ["header:X-Api-Key", "Header:X-Api-Key"])
def test_header_key_buckets_by_that_header(upstream_url: str, client: httpx.Client, key_part: str) -> None:
    # `Header:` is accepted by the settings' validation (the prefix is compared
    # case-insensitively there), so it must mean what `header:` means.
    path = unique_path()
    with running_edge(upstream_url, rate_limit_default="2/minute", rate_limit_key=[key_part]) as edge:

        def get(api_key: str) -> httpx.Response:
            return client.get(edge.url + path, headers={"X-Api-Key": api_key})

        alice = [get("alice") for _ in range(3)]
        bob = get("bob")
    assert [response.status_code for response in alice] == [200, 200, 429]
    assert bob.status_code == 200, "another X-Api-Key value shares the first one's bucket"
    assert remaining_and_reset(bob)["default-1m"][0] == 1


def test_route_key_shares_one_bucket_among_all_clients(upstream_url: str, client: httpx.Client) -> None:
    path = unique_path()
    with running_edge(
        upstream_url, rate_limit_default="3/minute", rate_limit_key=["route"], trusted_proxies=TRUST_LOOPBACK
    ) as edge:

        def get(forwarded_for: str) -> httpx.Response:
            return client.get(edge.url + path, headers={"x-forwarded-for": forwarded_for})

        responses = [get("203.0.113.1"), get("203.0.113.1"), get("203.0.113.2"), get("203.0.113.2")]
        first_again = get("203.0.113.1")
    assert [response.status_code for response in responses] == [200, 200, 200, 429]
    assert [remaining_and_reset(response)["default-1m"][0] for response in responses] == [2, 1, 0, 0]
    assert_rate_limited(first_again)


# -- 4. strategies ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["fixed-window", "sliding-window-counter", "moving-window"])
def test_every_strategy_refuses_past_the_limit(
    strategy: str, upstream_url: str, upstream: UpstreamApp, client: httpx.Client
) -> None:
    path = unique_path()
    with running_edge(upstream_url, rate_limit_default="3/minute", rate_limit_strategy=strategy) as edge:
        responses = [client.get(edge.url + path) for _ in range(5)]
    assert [response.status_code for response in responses] == [200, 200, 200, 429, 429]
    assert [remaining_and_reset(response)["default-1m"][0] for response in responses] == [2, 1, 0, 0, 0]
    for response in responses:
        assert quotas(response) == [("default-1m", 3, 60)]
        assert 0 <= remaining_and_reset(response)["default-1m"][1] <= 60
    for refused in responses[3:]:
        assert_rate_limited(refused)
        assert 1 <= retry_after(refused) <= 60
    assert times_forwarded(upstream, path) == 3


# -- 5. dry run ---------------------------------------------------------------------------------------------


def test_dry_run_refuses_nothing_sends_no_fields_and_logs_the_would_be_refusal(
    upstream_url: str, upstream: UpstreamApp, client: httpx.Client
) -> None:
    path = unique_path()
    with running_edge(upstream_url, rate_limit_default="2/minute", rate_limit_dry_run=True) as edge:
        with collect_records("edge.access") as access, collect_records("edge.rate_limit") as rate_limit:
            responses = [client.get(edge.url + path) for _ in range(4)]

            def four_lines_logged() -> bool:
                return sum(1 for r in access.snapshot() if getattr(r, "path", None) == path) == 4

            assert wait_until(four_lines_logged, timeout=5), "the access log did not get a line per request"
        access_lines = [r for r in access.snapshot() if getattr(r, "path", None) == path]
        would_refuse = [r for r in rate_limit.snapshot() if r.getMessage().startswith("dry run")]

    assert [response.status_code for response in responses] == [200] * 4
    for response in responses:
        assert has_no_rate_limit_fields(response), dict(response.headers)
    assert times_forwarded(upstream, path) == 4
    assert [r.levelno for r in access_lines] == [logging.INFO] * 4
    assert [getattr(r, "status", None) for r in access_lines] == [200] * 4
    assert [getattr(r, "rate_limit", None) for r in access_lines] == [
        "dry_run_allowed",
        "dry_run_allowed",
        "dry_run_limited",
        "dry_run_limited",
    ]
    assert len(would_refuse) == 2
    assert [getattr(r, "rate_limit", None) for r in would_refuse] == ["limited", "limited"]


def test_access_log_records_the_decision_when_enforcing(upstream_url: str, client: httpx.Client) -> None:
    path = unique_path()
    with running_edge(upstream_url, rate_limit_default="1/minute") as edge:
        with collect_records("edge.access") as access:
            statuses = [client.get(edge.url + path).status_code for _ in range(2)]

            def two_lines_logged() -> bool:
                return sum(1 for r in access.snapshot() if getattr(r, "path", None) == path) == 2

            assert wait_until(two_lines_logged, timeout=5)
        lines = [r for r in access.snapshot() if getattr(r, "path", None) == path]
    assert statuses == [200, 429]
    assert [(getattr(r, "status", None), getattr(r, "rate_limit", None)) for r in lines] == [
        (200, "allowed"),
        (429, "limited"),
    ]
    assert [getattr(r, "upstream_status", "missing") for r in lines] == [200, None]


# -- 6. legacy headers --------------------------------------------------------------------------------------


def legacy(response: httpx.Response) -> tuple[int, int, int]:
    values = []
    for name in ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"):
        found = response.headers.get_list(name)
        assert len(found) == 1, (name, found)
        assert found[0].isdigit(), (name, found)
        values.append(int(found[0]))
    return values[0], values[1], values[2]


def test_legacy_headers_match_the_ietf_fields(upstream_url: str, client: httpx.Client) -> None:
    path = unique_path()
    with running_edge(upstream_url, rate_limit_default="3/minute", rate_limit_legacy_headers=True) as edge:
        responses = [client.get(edge.url + path) for _ in range(4)]
    assert [response.status_code for response in responses] == [200, 200, 200, 429]
    assert [legacy(response)[:2] for response in responses] == [(3, 2), (3, 1), (3, 0), (3, 0)]
    for response in responses:
        remaining, reset = remaining_and_reset(response)["default-1m"]
        assert legacy(response) == (3, remaining, reset)
    assert retry_after(responses[3]) == max(1, legacy(responses[3])[2])


def test_legacy_headers_describe_the_most_constrained_quota(
    tmp_path: Path, upstream_url: str, client: httpx.Client
) -> None:
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text('[[routes]]\nname = "uploads"\npath = "/uploads"\nrate_limit = "5/minute;2/day"\n')
    path = unique_path("/uploads")
    with running_edge(
        upstream_url,
        policy=load_policy(policy_file),
        rate_limit_default="off",
        rate_limit_legacy_headers=True,
    ) as edge:
        first = client.get(edge.url + path)
        without_legacy_default = client.get(edge.url + unique_path())
    assert first.status_code == 200
    limits = remaining_and_reset(first)
    assert {name: r for name, (r, _) in limits.items()} == {"uploads-1m": 4, "uploads-1d": 1}
    assert legacy(first) == (2, 1, limits["uploads-1d"][1])
    assert 86399 <= legacy(first)[2] <= 86400
    # The default is off: no fields of either kind there.
    assert without_legacy_default.status_code == 200
    assert has_no_rate_limit_fields(without_legacy_default)
    assert "x-ratelimit-remaining" not in without_legacy_default.headers


def test_legacy_headers_are_off_by_default(upstream_url: str, client: httpx.Client) -> None:
    with running_edge(upstream_url, rate_limit_default="3/minute") as edge:
        response = client.get(edge.url + unique_path())
    assert response.status_code == 200
    assert remaining_and_reset(response)["default-1m"][0] == 2
    assert not any(name.lower().startswith("x-ratelimit") for name in response.headers)


# -- 7. a 429 passes the layers above rate limiting ---------------------------------------------------------


def test_429_carries_cors_and_security_headers_for_an_allowed_origin(upstream_url: str, client: httpx.Client) -> None:
    path = unique_path()
    origin = "https://app.example.com"
    with running_edge(upstream_url, rate_limit_default="1/minute", cors_allow_origins=[origin]) as edge:
        admitted = client.get(edge.url + path, headers={"origin": origin})
        refused = client.get(edge.url + path, headers={"origin": origin})
        refused_other_origin = client.get(edge.url + path, headers={"origin": "https://evil.example"})

    assert admitted.status_code == 200
    assert_rate_limited(refused)
    assert refused.headers.get_list("access-control-allow-origin") == [origin]
    vary = [part.strip().lower() for value in refused.headers.get_list("vary") for part in value.split(",")]
    assert "origin" in vary
    exposed = {
        part.strip().lower()
        for value in refused.headers.get_list("access-control-expose-headers")
        for part in value.split(",")
    }
    assert {"retry-after", "ratelimit", "ratelimit-policy", "x-request-id"} <= exposed
    assert refused.headers["x-content-type-options"] == "nosniff"
    assert refused.headers["x-frame-options"] == "DENY"
    assert refused.headers["strict-transport-security"].startswith("max-age=")
    assert refused.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    assert 1 <= retry_after(refused) <= 60

    assert_rate_limited(refused_other_origin)
    assert "access-control-allow-origin" not in refused_other_origin.headers
    assert refused_other_origin.headers["x-content-type-options"] == "nosniff"


# -- WebSocket upgrades are limited like any request --------------------------------------------------------


def test_websocket_upgrade_over_the_limit_is_refused_with_429_and_retry_after(
    upstream_url: str, upstream: UpstreamApp
) -> None:
    with running_edge(upstream_url, rate_limit_default="1/minute") as edge:
        url = f"ws://127.0.0.1:{edge.port}/ws/echo"
        with connect(url, open_timeout=5) as websocket:
            websocket.send("hello")
            assert websocket.recv(timeout=5) == "hello"
        with pytest.raises(InvalidStatus) as refused:
            connect(url, open_timeout=5)
    response = refused.value.response
    assert response.status_code == 429
    assert response.headers.get("content-type") == "application/json"
    body = json.loads(response.body or b"null")
    assert body["error"]["code"] == "rate_limited"
    assert body["error"]["request_id"] == response.headers.get("x-request-id")
    # "a rejection is 429 in the error envelope with Retry-After" (edge/concerns/rate_limit.py)
    retry = response.headers.get_all("retry-after")
    assert len(retry) == 1, f"Retry-After: {retry!r} in {dict(response.headers)}"
    assert retry[0].isdigit()
    assert 1 <= int(retry[0]) <= 60
    assert body["error"]["message"] == f"Too many requests. Retry in {seconds(int(retry[0]))}."
    policies = response.headers.get_all("ratelimit-policy")
    assert [parse_sf_list(value) for value in policies] == [[("default-1m", {"q": 1, "w": 60})]]


def test_an_unlimited_edge_sends_no_rate_limit_fields(
    edge: RunningEdge, client: httpx.Client, upstream: UpstreamApp
) -> None:
    # The session edge runs with rate_limit_default="off" (tests.servers.start_edge).
    path = unique_path()
    responses = [client.get(edge.url + path) for _ in range(5)]
    assert [response.status_code for response in responses] == [200] * 5
    for response in responses:
        assert has_no_rate_limit_fields(response)
    assert times_forwarded(upstream, path) == 5
