"""`Outbound`: named policies bound to authorities, clients on the one shared transport, and
a third-party SDK (qdrant-client) on that same transport."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import httpx
import pytest

from app.outbound import Outbound, OutboundSettings
from tests.outbound_support import (
    Reply,
    ScriptedUpstream,
    outbound,
    outcomes,
    policy,
    scripted_upstream,
    telemetry,
)
from tests.servers import closed_port


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with scripted_upstream() as server:
        yield server


def test_states_name_each_registered_authority_before_any_call() -> None:
    async def scenario() -> dict[str, str]:
        out = Outbound(OutboundSettings())
        out.register("groq", "https://api.groq.com/openai/v1")
        out.register("elevenlabs", "https://api.elevenlabs.io")
        out.register("qdrant", "http://qdrant:6333")
        out.register("groq", "https://api.groq.com/other")  # the same binding again
        states = out.states()
        await out.aclose()
        return states

    assert asyncio.run(scenario()) == {
        "api.groq.com:443": "closed",
        "api.elevenlabs.io:443": "closed",
        "qdrant:6333": "closed",
    }


def test_named_states_name_each_registered_provider_and_no_address() -> None:
    async def scenario() -> tuple[dict[str, str], dict[str, str]]:
        out = Outbound(OutboundSettings())
        out.register("groq", "http://127.0.0.1:9100/openai/v1")
        out.register("elevenlabs", "http://127.0.0.1:9100")  # one simulator for both: one breaker
        out.register("qdrant", "http://qdrant:6333")
        # A host met in a request, not registered: in `states`, but it has no name to show.
        async with httpx.AsyncClient(transport=out.transport) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://127.0.0.1:{closed_port()}/")
        named, by_authority = out.named_states(), out.states()
        await out.aclose()
        return named, by_authority

    named, by_authority = asyncio.run(scenario())
    assert named == {"groq": "closed", "elevenlabs": "closed", "qdrant": "closed"}
    assert len(by_authority) == 3  # the simulator's, Qdrant's and the unregistered host's
    assert "127.0.0.1:9100" in by_authority


def test_names_pick_their_policies_and_unknown_names_get_the_default() -> None:
    settings = OutboundSettings()
    out = Outbound(settings)
    out.register("groq", "https://api.groq.com")
    out.register("elevenlabs", "https://api.elevenlabs.io")
    out.register("weather", "https://weather.example")
    assert [(host.authority, host.policy_name, host.policy) for host in out.transport.hosts] == [
        ("api.groq.com:443", "groq", settings.groq),
        ("api.elevenlabs.io:443", "elevenlabs", settings.elevenlabs),
        ("weather.example:443", "weather", settings.default),
    ]


def test_two_names_on_one_authority_share_its_breaker_and_the_first_policy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = Outbound(OutboundSettings())
    out.register("groq", "https://api.groq.com")
    with caplog.at_level(logging.WARNING, logger="app.outbound"):
        out.register("elevenlabs", "https://api.groq.com/openai/v1/audio")
    assert [(host.authority, host.policy_name) for host in out.transport.hosts] == [("api.groq.com:443", "groq")]
    assert any("shares api.groq.com:443 with 'groq'" in record.getMessage() for record in caplog.records)
    with pytest.raises(ValueError, match="not an http"):
        out.register("files", "file:///tmp")


def test_an_unregistered_host_gets_the_default_policy_and_can_be_registered_later(
    upstream: ScriptedUpstream,
) -> None:
    upstream.script("/later", then=200)

    async def scenario() -> list[tuple[str, bool]]:
        out = outbound(policy())
        plain = httpx.AsyncClient(transport=out.transport)  # as a misbuilt client would
        assert (await plain.get(f"{upstream.url}/later")).status_code == 200
        seen_first = [(host.policy_name, host.registered) for host in out.transport.hosts]
        out.register("named", upstream.url)
        seen_after = [(host.policy_name, host.registered) for host in out.transport.hosts]
        await out.aclose()
        return seen_first + seen_after

    assert asyncio.run(scenario()) == [("default", False), ("named", True)]


def test_clients_share_the_transport_and_closing_one_leaves_the_others_working(
    upstream: ScriptedUpstream,
) -> None:
    upstream.script("/shared", 500, 500, then=200)

    async def scenario() -> None:
        out = outbound(policy(minimum_calls=2, window_size=2))
        first = out.client("upstream", upstream.url)
        second = out.client("upstream", upstream.url, headers={"x-api-key": "k"})
        assert await outcomes(first, "/shared", 2) == [500, 500]
        assert await outcomes(second, "/shared", 1) == ["BreakerOpen"]  # the same breaker
        await first.aclose()
        await asyncio.sleep(0.35)  # the breaker's open time
        assert await outcomes(second, "/shared", 1) == [200]
        await out.aclose()

    asyncio.run(scenario())
    assert upstream.seen_at("/shared")[-1].headers["x-api-key"] == "k"


def test_clients_follow_no_redirects_and_keep_no_cookies(upstream: ScriptedUpstream) -> None:
    upstream.script("/moved", then=Reply(302, headers=(("location", "/elsewhere"),)))
    upstream.script("/cookie", then=Reply(200, headers=(("set-cookie", "session=abc; Path=/"),)))

    async def scenario() -> None:
        out = outbound(policy())
        client = out.client("upstream", upstream.url)
        assert await outcomes(client, "/moved", 1) == [302]
        assert await outcomes(client, "/cookie", 2) == [200, 200]
        await out.aclose()

    asyncio.run(scenario())
    assert upstream.seen_at("/elsewhere") == []
    assert [request.headers.get("cookie") for request in upstream.seen_at("/cookie")] == [None, None]


def test_clients_ignore_proxy_settings_in_the_environment(
    upstream: ScriptedUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    unreachable_proxy = f"http://127.0.0.1:{closed_port()}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, unreachable_proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    upstream.script("/direct", then=200)

    async def scenario() -> list[int | str]:
        out = Outbound(OutboundSettings(default=policy()))
        results = await outcomes(out.client("upstream", upstream.url), "/direct", 1)
        await out.aclose()
        return results

    assert asyncio.run(scenario()) == [200]


def test_timeouts_set_on_a_client_give_way_to_the_policy(upstream: ScriptedUpstream) -> None:
    upstream.script("/takes-a-while", then=Reply(200, delay=0.3))

    async def scenario() -> int:
        out = outbound(policy(attempt_timeout=2.0))
        # An SDK building its own client with its own short timeout.
        client = httpx.AsyncClient(base_url=upstream.url, timeout=0.05, **out.httpx_kwargs("sdk", upstream.url))
        status = (await client.get("/takes-a-while")).status_code
        await out.aclose()
        return status

    assert asyncio.run(scenario()) == 200


def test_qdrant_client_runs_on_the_shared_transport(upstream: ScriptedUpstream) -> None:
    from qdrant_client import AsyncQdrantClient

    upstream.script(
        "/collections",
        then=Reply(200, body=b'{"result":{"collections":[{"name":"memories"}]},"status":"ok","time":0.001}'),
    )
    recorded = telemetry()

    async def scenario() -> list[str]:
        out = outbound(policy(), recorded, qdrant=policy(all_methods_idempotent=True))
        qdrant = AsyncQdrantClient(
            url=upstream.url, check_compatibility=False, **out.httpx_kwargs("qdrant", upstream.url)
        )
        collections = await qdrant.get_collections()
        await qdrant.close()
        states = out.states()
        await out.aclose()
        assert states == {upstream.url.removeprefix("http://"): "closed"}
        return [collection.name for collection in collections.collections]

    assert asyncio.run(scenario()) == ["memories"]
    [span] = [span for span in recorded.finished_spans() if span.name == "GET"]
    assert (span.attributes or {})["outbound.policy"] == "qdrant"
    [request] = upstream.seen_at("/collections")
    assert request.headers["traceparent"].split("-")[2] == f"{span.context.span_id:016x}"
    assert request.headers["user-agent"].startswith("python-client/")
