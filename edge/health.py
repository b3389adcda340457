"""`/_edge/live` and `/_edge/ready`: answered by the edge itself, never forwarded.

Ready means every dependency is `up` or `degraded` (working around a failure, such as a
rate-limit store that is down while the edge admits requests, or an upstream of which only
some addresses answer); one `down` makes it 503. Only these states are shown, never an
address.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Literal

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

State = Literal["up", "degraded", "down"]
ReadinessCheck = Callable[[], Awaitable[State]]

NO_STORE = {"cache-control": "no-store"}


def health_routes(checks: Mapping[str, ReadinessCheck]) -> list[Route]:
    async def live(request: Request) -> JSONResponse:
        return JSONResponse({"status": "alive"}, headers=NO_STORE)

    async def ready(request: Request) -> JSONResponse:
        states = await check_all(checks)
        ready = "down" not in states.values()
        return JSONResponse(
            {"status": "ready" if ready else "unavailable", "checks": states},
            status_code=200 if ready else 503,
            headers=NO_STORE,
        )

    return [
        Route("/live", live, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
    ]


async def check_all(checks: Mapping[str, ReadinessCheck]) -> dict[str, State]:
    return dict(zip(checks, await asyncio.gather(*(check() for check in checks.values())), strict=True))


async def is_ready(checks: Mapping[str, ReadinessCheck]) -> bool:
    return "down" not in (await check_all(checks)).values()
