"""The edge application: the layers around the proxy core, in the order they run.

The request path is pure ASGI from the socket to the upstream. Starlette serves the edge's
own endpoints under `/_edge/` (and the lifespan), but the proxied path does not pass
through Starlette's application stack: its error and routing wrappers cost about 30 % of
the edge's throughput on small requests (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from edge import errors
from edge.health import health_routes
from edge.proxy import Proxy
from edge.proxy.ingress import IngressMiddleware
from edge.settings import EdgeSettings, load_settings

EDGE_PATH = "/_edge"


class EdgeApp:
    """Answers `/_edge/...` itself and sends everything else to the proxy core."""

    def __init__(self, own_endpoints: ASGIApp, proxy: ASGIApp) -> None:
        self.own_endpoints = own_endpoints
        self.proxy = proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The decoded path is matched, so no encoding of `/_edge/` reaches the upstream.
        if scope["type"] == "lifespan" or scope["path"] == EDGE_PATH or scope["path"].startswith("/_edge/"):
            await self.own_endpoints(scope, receive, send)
        else:
            await self.proxy(scope, receive, send)


def build_app(settings: EdgeSettings, proxy: Proxy | None = None) -> ASGIApp:
    proxy = proxy or Proxy(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        proxy.pool.close()

    own_endpoints = Starlette(
        routes=[Mount(EDGE_PATH, routes=health_routes({"upstream": proxy.pool.check}))],
        lifespan=lifespan,
        exception_handlers={HTTPException: _edge_route_error},
    )

    # Outermost first: a request passes these top to bottom, its response bottom to top.
    chain = [
        Middleware(IngressMiddleware, trusted_proxies=settings.trusted_proxies),
    ]
    app: ASGIApp = EdgeApp(own_endpoints, proxy)
    for cls, args, kwargs in reversed(chain):
        app = cls(app, *args, **kwargs)
    return app


def create_app() -> ASGIApp:
    """Factory for uvicorn's worker processes: each reads the same environment."""
    return build_app(load_settings())


async def _edge_route_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = errors.METHOD_NOT_ALLOWED if exc.status_code == 405 else errors.NOT_FOUND
    body = errors.error_body(error, errors.request_id_of(request.scope))
    allow = [
        (b"allow", value.encode()) for name, value in (exc.headers or {}).items() if name.lower() == "allow"
    ]
    response = Response(body, status_code=error.status)
    response.raw_headers = errors.error_headers(body, allow)
    return response
