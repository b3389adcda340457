"""`/_edge/live` and `/_edge/ready`: answered by the edge itself, never forwarded."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

ReadinessCheck = Callable[[], Awaitable[bool]]

NO_STORE = {"cache-control": "no-store"}


def health_routes(checks: Mapping[str, ReadinessCheck]) -> list[Route]:
    async def live(request: Request) -> JSONResponse:
        return JSONResponse({"status": "alive"}, headers=NO_STORE)

    async def ready(request: Request) -> JSONResponse:
        results = await asyncio.gather(*(check() for check in checks.values()))
        states = {name: "up" if ok else "down" for name, ok in zip(checks, results, strict=True)}
        is_ready = all(results)
        return JSONResponse(
            {"status": "ready" if is_ready else "unavailable", "checks": states},
            status_code=200 if is_ready else 503,
            headers=NO_STORE,
        )

    return [
        Route("/live", live, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
    ]
