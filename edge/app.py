"""The edge application: the layers around the proxy core, in the order they run.

The request path is pure ASGI from the socket to the upstream. Starlette serves the edge's
own endpoints under `/_edge/` (and the lifespan), but the proxied path does not pass
through Starlette's application stack: its error and routing wrappers cost about 30 % of
the edge's throughput on small requests (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from common.error_tracking import init_error_tracking
from common.metrics import RequestDurationMiddleware
from common.settings import Environment
from common.telemetry import configure_telemetry
from edge import errors
from edge.concerns.access_log import AccessLogMiddleware
from edge.concerns.cache_policy import CachePolicyMiddleware, cache_control_value
from edge.concerns.client_concurrency import ClientConcurrencyMiddleware
from edge.concerns.cors import CorsMiddleware
from edge.concerns.rate_limit import LimitStore, RateLimitMiddleware, build_route_policies
from edge.concerns.request_id import RequestIdMiddleware
from edge.concerns.request_metrics import EdgeErrors, RouteLabels
from edge.concerns.security_headers import (
    API_CONTENT_SECURITY_POLICY,
    NO_REFERRER,
    STRICT_ORIGIN_WHEN_CROSS_ORIGIN,
    SecurityHeadersMiddleware,
    html_content_security_policy,
    preset,
)
from edge.concerns.size_limits import SizeLimitMiddleware
from edge.concerns.tracing import TracingMiddleware
from edge.health import ReadinessCheck, health_routes, is_ready
from edge.metrics import EdgeMetrics
from edge.policy import PathRedactor, Policy, RouteTable, load_policy
from edge.proxy import Proxy, Resolve, resolve_host
from edge.proxy.ingress import IngressMiddleware
from edge.scope import EDGE_PATH, is_edge_path
from edge.settings import EdgeSettings, load_settings

SAMPLE_SECONDS = 10.0
# What `OPTIONS *` (a question about the server, not a resource) is told the edge forwards.
SERVER_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


class EdgeApp:
    """Answers `/_edge/...` and `OPTIONS *` itself and sends everything else to the proxy core."""

    def __init__(self, own_endpoints: ASGIApp, proxy: ASGIApp) -> None:
        self.own_endpoints = own_endpoints
        self.proxy = proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The decoded path is matched, so no encoding of `/_edge/` reaches the upstream.
        if scope["type"] == "lifespan" or is_edge_path(scope["path"]):
            await self.own_endpoints(scope, receive, send)
        elif scope["path"] == "*":  # the server rules admit only `OPTIONS *`
            await send({"type": "http.response.start", "status": 204, "headers": [(b"allow", SERVER_METHODS)]})
            await send({"type": "http.response.body", "body": b""})
        else:
            await self.proxy(scope, receive, send)


def build_app(
    settings: EdgeSettings,
    policy: Policy,
    *,
    resolve: Resolve = resolve_host,
    registry: CollectorRegistry | None = None,
) -> ASGIApp:
    """The edge; `resolve` turns the upstream's name into its addresses (the system
    resolver). With a `registry` (whoever runs the edge serves it: edge/server/serve.py)
    every request is timed and its series go there; without, no request pays for metrics
    nobody scrapes."""
    proxy = Proxy(
        settings.upstream_url,
        pool_size=settings.upstream_pool_size,
        connect_timeout=settings.upstream_connect_timeout,
        read_timeout=settings.upstream_read_timeout,
        idle_timeout=settings.upstream_idle_timeout,
        eject_time=settings.upstream_eject_time,
        resolve_interval=settings.upstream_resolve_interval,
        max_tries=settings.upstream_max_tries,
        resolve=resolve,
        request_buffer_bytes=settings.request_buffer_bytes,
        ws_max_message_bytes=settings.ws_max_message_bytes,
    )
    init_error_tracking(settings, "edge")  # each worker process builds its own app, and initialises its own
    telemetry = configure_telemetry(settings)
    metrics = EdgeMetrics.build(registry or CollectorRegistry())
    timed = [
        Middleware(
            RequestDurationMiddleware,
            duration=metrics.request_duration,
            route_of=RouteLabels(policy),
            finished=EdgeErrors(metrics.errors),
        )
    ]
    limit_store = LimitStore(
        settings.rate_limit_storage_url,
        settings.rate_limit_strategy,
        key_prefix=settings.rate_limit_key_prefix,
        timeout=settings.rate_limit_store_timeout,
        on_error=settings.rate_limit_on_store_error,
        errors=metrics.rate_limit_store_errors,
        degraded=metrics.rate_limit_store_degraded,
        degraded_seconds=metrics.rate_limit_store_degraded_seconds,
    )
    checks = {"upstream": proxy.pool.check, "rate_limit_store": limit_store.health}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Everything built so far lives as long as the process: moved out of the garbage
        # collector's sight, full collections stop walking it on every cycle (measured at
        # an eighth of the edge's CPU under load).
        gc.collect()
        gc.freeze()
        # Only for a scrape: the readiness check opens an upstream connection each time.
        sampler = asyncio.create_task(_sample_periodically(metrics, proxy, checks)) if registry is not None else None
        yield
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        proxy.pool.close()
        telemetry.shutdown()

    own_endpoints = Starlette(
        routes=[Mount(EDGE_PATH, app=Router(health_routes(checks), redirect_slashes=False))],
        lifespan=lifespan,
        exception_handlers={HTTPException: _edge_route_error},
    )
    # No trailing-slash redirects (`/_edge`, `/_edge/live/`): Starlette builds their absolute
    # `Location` from the client's unvalidated `Host`. Those paths are 404s in the envelope.
    own_endpoints.router.redirect_slashes = False
    production_like = settings.environment != Environment.development
    redact_path = PathRedactor(policy)

    # Outermost first: a request passes these top to bottom, its response bottom to top,
    # so every response made by a lower layer (403, 413, 429, 431, 502...) gets the
    # headers of the layers above it: request id, security headers, CORS.
    chain = [
        *(timed if registry is not None else []),
        Middleware(IngressMiddleware, trusted_proxies=settings.trusted_proxies),
        Middleware(RequestIdMiddleware),
        Middleware(TracingMiddleware, tracer=telemetry.tracer, redact=redact_path),
        *([Middleware(AccessLogMiddleware, redact=redact_path)] if settings.access_log else []),
        Middleware(
            SecurityHeadersMiddleware,
            api_headers=preset(API_CONTENT_SECURITY_POLICY, settings.hsts_max_age, NO_REFERRER),
            html_headers=preset(
                settings.content_security_policy or html_content_security_policy(production_like),
                settings.hsts_max_age,
                STRICT_ORIGIN_WHEN_CROSS_ORIGIN,
            ),
        ),
        Middleware(
            CorsMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_credentials=settings.cors_allow_credentials,
            allow_methods=settings.cors_allow_methods,
            allow_headers=settings.cors_allow_headers,
            expose_headers=settings.cors_expose_headers,
            max_age=settings.cors_max_age,
        ),
        Middleware(
            SizeLimitMiddleware,
            body_limits=RouteTable.from_policy(policy, settings.max_body_bytes, lambda rule: rule.max_body_bytes),
            max_header_count=settings.max_header_count,
            max_header_bytes=settings.max_header_bytes,
        ),
        Middleware(ClientConcurrencyMiddleware, max_exchanges=settings.max_exchanges_per_client),
        Middleware(
            RateLimitMiddleware,
            store=limit_store,
            routes=build_route_policies(policy, settings.rate_limit_default, settings.rate_limit_key),
            dry_run=settings.rate_limit_dry_run,
            legacy_headers=settings.rate_limit_legacy_headers,
            decisions=metrics.rate_limit_decisions,
        ),
        Middleware(
            CachePolicyMiddleware,
            rules=RouteTable.from_policy(
                policy, None, lambda rule: cache_control_value(rule.cache) if rule.cache else None
            ),
            api_prefixes=settings.api_path_prefixes,
        ),
    ]
    app: ASGIApp = EdgeApp(own_endpoints, proxy)
    for cls, args, kwargs in reversed(chain):
        app = cls(app, *args, **kwargs)
    return app


async def _sample_periodically(metrics: EdgeMetrics, proxy: Proxy, checks: Mapping[str, ReadinessCheck]) -> None:
    """The pool's connections and the readiness check, every `SAMPLE_SECONDS`: gauges
    a scrape reads (one worker's view each, added up by the supervisor)."""
    while True:
        metrics.upstream_connections.labels("in_use").set(proxy.pool.in_use)
        metrics.upstream_connections.labels("idle").set(proxy.pool.idle)
        try:
            metrics.readiness.set(await is_ready(checks))
        except Exception:  # a check that fails is not ready; the next one tries again
            metrics.readiness.set(0)
        await asyncio.sleep(SAMPLE_SECONDS)


def create_app() -> ASGIApp:
    """Factory for uvicorn's worker processes: each reads the same environment."""
    settings = load_settings()
    # With a metrics port the values go to the files the supervisor adds up (common/metrics.py).
    registry = CollectorRegistry() if settings.metrics_port is not None else None
    return build_app(settings, load_policy(settings.policy_file), registry=registry)


async def _edge_route_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = errors.METHOD_NOT_ALLOWED if exc.status_code == 405 else errors.NOT_FOUND
    body = errors.error_body(error, errors.request_id_of(request.scope))
    allow = [(b"allow", value.encode()) for name, value in (exc.headers or {}).items() if name.lower() == "allow"]
    response = Response(body, status_code=error.status)
    response.raw_headers = errors.error_headers(body, allow)
    return response
