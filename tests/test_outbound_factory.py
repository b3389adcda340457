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


def test_named_states_name_each_registered_provider_before_any_call_and_no_address() -> None:
    async def scenario() -> tuple[dict[str, str], int]:
        out = Outbound(OutboundSettings())
        out.register("groq", "https://api.groq.com/openai/v1")
        out.register("elevenlabs", "https://api.elevenlabs.io")
        out.register("qdrant", "http://qdrant:6333")
        out.register("groq", "https://api.groq.com/other")  # the same binding again
        # A host met in a request, not registered: it has no name to show.
        async with httpx.AsyncClient(transport=out.transport) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://127.0.0.1:{closed_port()}/")
        named, hosts = out.named_states(), len(out.transport.hosts)
        await out.aclose()
        return named, hosts

    assert asyncio.run(scenario()) == ({"groq": "closed", "elevenlabs": "closed", "qdrant": "closed"}, 4)


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
    with pytest.raises(ValueError, match="not an http"):
        out.register("files", "file:///tmp")


def test_two_providers_at_one_address_keep_their_own_breakers_and_limits(
    upstream: ScriptedUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    # One simulator standing in for both providers, as in development.
    upstream.script("/chat", then=500)
    upstream.script("/speech", then=Reply(200, delay=0.2))
    settings = OutboundSettings(
        groq=policy(minimum_calls=2, window_size=2, max_concurrency=32, open_seconds=30.0),
        elevenlabs=policy(max_concurrency=3, bulkhead_wait=0.0),
    )

    async def scenario() -> tuple[list[int | str], list[str], dict[str, str]]:
        out = Outbound(settings)
        with caplog.at_level(logging.WARNING, logger="app.outbound"):
            groq = out.client("groq", upstream.url)
            elevenlabs = out.client("elevenlabs", upstream.url)
        assert await outcomes(groq, "/chat", 3) == [500, 500, "BreakerOpen"]
        # ElevenLabs is not behind Groq's open breaker, and has its own 3 slots.
        calls = [asyncio.ensure_future(elevenlabs.get("/speech")) for _ in range(5)]
        done = await asyncio.gather(*calls, return_exceptions=True)
        speech = [reply.status_code if isinstance(reply, httpx.Response) else type(reply).__name__ for reply in done]
        hosts = [host.policy_name for host in out.transport.hosts]
        named = out.named_states()
        await out.aclose()
        return speech, hosts, named

    speech, hosts, named = asyncio.run(scenario())
    assert sorted(speech, key=str) == [200, 200, 200, "BulkheadFull", "BulkheadFull"]
    assert hosts == ["groq", "elevenlabs"]
    assert named == {"groq": "open", "elevenlabs": "closed"}
    assert [record.getMessage() for record in caplog.records if "shares" in record.getMessage()] == []


def test_a_request_naming_no_provider_gets_the_addresses_own_default_state(upstream: ScriptedUpstream) -> None:
    upstream.script("/anonymous", then=500)

    async def scenario() -> tuple[list[int | str], list[int | str], dict[str, str], list[str]]:
        out = outbound(policy(minimum_calls=2, window_size=2, open_seconds=30.0))
        named = out.client("named", upstream.url)
        plain = httpx.AsyncClient(base_url=upstream.url, transport=out.transport)  # as a misbuilt client would
        failing = await outcomes(plain, "/anonymous", 3)
        still_served = await outcomes(named, "/anonymous", 1)
        states = out.named_states()
        hosts = [host.policy_name for host in out.transport.hosts]
        await out.aclose()
        return failing, still_served, states, hosts

    failing, still_served, states, hosts = asyncio.run(scenario())
    assert failing == [500, 500, "BreakerOpen"]
    assert still_served == [500]  # the named provider's breaker saw none of the nameless calls
    assert states == {"named": "closed"}
    assert hosts == ["named", "default"]


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
        hosts = [host.policy_name for host in out.transport.hosts]
        await out.aclose()
        assert hosts == ["qdrant"]  # its requests carried the name: no nameless host appeared
        return [collection.name for collection in collections.collections]

    assert asyncio.run(scenario()) == ["memories"]
    [span] = [span for span in recorded.finished_spans() if span.name == "GET"]
    assert (span.attributes or {})["outbound.policy"] == "qdrant"
    [request] = upstream.seen_at("/collections")
    assert request.headers["traceparent"].split("-")[2] == f"{span.context.span_id:016x}"
    assert request.headers["user-agent"].startswith("python-client/")
