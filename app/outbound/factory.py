"""`Outbound`: the one place outbound httpx clients come from, all on one shared transport.

Each client marks its requests with its provider's name (`outbound.provider`), so the
transport applies that provider's policy, breaker and limits even where two providers
share an address, and with the `X-Request-ID` of the request it serves, so a provider's
log lines (the simulator's) can be found from the edge's and the app's."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import httpx
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from app.outbound.host import Host
from app.outbound.policy import OutboundSettings
from app.outbound.telemetry import INSTRUMENTATION_NAME, OutboundMetrics
from app.outbound.transport import PROVIDER_EXTENSION, ResilientTransport
from common.logs import request_id_var


class Outbound:
    """Builds the shared `ResilientTransport` and the clients on it.

    Every provider client is built here (`client`), or, for a third-party SDK that builds
    its own httpx client, from `httpx_kwargs`, so nothing reaches the network any other way.
    """

    def __init__(
        self,
        settings: OutboundSettings,
        *,
        tracer: trace.Tracer | None = None,
        metrics: OutboundMetrics | None = None,
        inner: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.transport = ResilientTransport(
            inner or httpx.AsyncHTTPTransport(trust_env=False),
            settings.default,
            tracer or trace.get_tracer(INSTRUMENTATION_NAME),
            metrics or OutboundMetrics.build(CollectorRegistry()),
        )
        self._named: dict[str, Host] = {}

    def register(self, name: str, base_url: str) -> None:
        """Binds the provider `name` to the authority of `base_url`, with the policy of that
        name (`default` for names without one)."""
        self._named[name] = self.transport.bind(base_url, name, self.settings.policy_named(name))

    def client(self, name: str, base_url: str, *, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
        """An AsyncClient for one provider on the shared transport: no redirects followed, no
        proxy or certificate settings taken from the environment, and no cookies kept
        (every call stands alone, whoever it is made for)."""
        self.register(name, base_url)
        return httpx.AsyncClient(base_url=base_url, headers=headers, **self._client_options(name))

    def httpx_kwargs(self, name: str, base_url: str) -> dict[str, Any]:
        """Keyword arguments for a third-party SDK that builds its own httpx.AsyncClient
        (e.g. `AsyncQdrantClient(url=..., **outbound.httpx_kwargs("qdrant", url))`)."""
        self.register(name, base_url)
        return self._client_options(name)

    def named_states(self) -> dict[str, str]:
        """Breaker state (`closed`, `open`, `half_open`) per registered name (`groq`, ...),
        for public readiness: no address."""
        return {name: host.breaker.state for name, host in self._named.items()}

    async def aclose(self) -> None:
        await self.transport.shutdown()

    def _client_options(self, name: str) -> dict[str, Any]:
        return {
            "transport": self.transport,
            "event_hooks": {"request": [_mark_request(name)]},
            "follow_redirects": False,
            "trust_env": False,
            "cookies": CookieJar(DefaultCookiePolicy(allowed_domains=[])),  # accepts no cookie
        }


def _mark_request(name: str) -> Callable[[httpx.Request], Awaitable[None]]:
    async def mark(request: httpx.Request) -> None:
        request.extensions[PROVIDER_EXTENSION] = name
        request_id = request_id_var.get()
        if request_id is not None:
            request.headers.setdefault("x-request-id", request_id)

    return mark
