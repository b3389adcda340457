"""The naive reference point: the reverse proxy most people write first.

A Starlette app with a catch-all route and a `BaseHTTPMiddleware`, forwarding each request
with one shared `httpx.AsyncClient` and `client.request(...)`: the request body is read
whole, the response is read whole, headers go through httpx's mapping. It is what the
edge is compared against from below (nginx is the comparison from above). Not for use:
it buffers bodies in memory, joins repeated response headers such as `Set-Cookie` into one
(httpx's mapping) and forwards `Content-Encoding` with a body httpx has decompressed.

Run: `python bench/naive_proxy.py --port 9002 --upstream http://127.0.0.1:9001`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class TimingMiddleware(BaseHTTPMiddleware):
    """The usual first middleware: how long did the request take."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        response.headers["x-process-time"] = f"{time.perf_counter() - started:.6f}"
        return response


def build_app(upstream: str) -> Starlette:
    client = httpx.AsyncClient(base_url=upstream, timeout=60.0)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    async def proxy(request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        client_host = request.client.host if request.client else "unknown"
        headers["x-forwarded-for"] = client_host
        headers["x-forwarded-proto"] = request.url.scheme
        headers["x-forwarded-host"] = request.headers.get("host", "")
        upstream_response = await client.request(
            request.method,
            request.url.path,
            params=request.query_params,
            headers=headers,
            content=await request.body(),
        )
        response_headers = {
            k: v
            for k, v in upstream_response.headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"
        }
        return Response(
            content=upstream_response.content,
            status_code=upstream_response.status_code,
            headers=response_headers,
        )

    return Starlette(
        routes=[Route("/{path:path}", proxy, methods=METHODS)],
        middleware=[Middleware(TimingMiddleware)],
        lifespan=lifespan,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9001")
    args = parser.parse_args()
    # uvicorn's defaults pick uvloop and httptools when installed, as in a real first attempt;
    # the access log is off so that every contender is measured without per-request logging.
    uvicorn.run(build_app(args.upstream), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
