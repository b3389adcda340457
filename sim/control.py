"""The simulator's own API under `/_sim/`: faults, latency, call counts, what chat calls
were given, health.

Tests and developers drive it over HTTP, so a test of the app can make a provider fail
while the app runs in another process. Its own errors use the project's envelope
(common/envelope.py), not a provider's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from common.envelope import envelope
from sim.pipeline import ROUTES, FaultSpec, SimState

MAX_BODY = 64 * 1024
_FAULTS = TypeAdapter(FaultSpec | list[FaultSpec])


class LatencyUpdate(BaseModel):
    """`PUT /_sim/latency`: extra milliseconds per route; routes left out keep theirs."""

    model_config = ConfigDict(extra="forbid")

    chat: int | None = Field(None, ge=0, le=600_000)
    transcribe: int | None = Field(None, ge=0, le=600_000)
    speech: int | None = Field(None, ge=0, le=600_000)


def invalid(message: str, details: Any = None) -> Response:
    return Response(envelope("invalid_request", message, None, details), 400, media_type="application/json")


def problems(error: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": list(problem["loc"]), "msg": problem["msg"].removeprefix("Value error, ")}
        for problem in error.errors(include_url=False)
    ]


async def read_json(request: Request) -> bytes | None:
    body = await request.body()
    return body if len(body) <= MAX_BODY else None


def control_routes(state: SimState, reset_budgets: Callable[[], None], health: dict[str, Any]) -> list[Route]:
    async def get_health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", **health})

    async def add_faults(request: Request) -> Response:
        body = await read_json(request)
        if body is None:
            return invalid("the body is too large")
        try:
            parsed = _FAULTS.validate_json(body)
        except ValidationError as error:
            return invalid(
                'a fault is {"route": "chat"|"transcribe"|"speech", "status": 503, "times": 5, '
                '"delay_ms": 0} or {"route": ..., "hang": true}, or a list of them',
                problems(error),
            )
        specs = parsed if isinstance(parsed, list) else [parsed]
        added = [state.add_fault(spec).describe() for spec in specs]
        return JSONResponse({"added": added, "faults": state.list_faults()}, 201)

    async def list_faults(request: Request) -> JSONResponse:
        return JSONResponse({"faults": state.list_faults()})

    async def clear_faults(request: Request) -> JSONResponse:
        cleared = len(state.list_faults())
        state.clear_faults()
        return JSONResponse({"cleared": cleared})

    async def get_calls(request: Request) -> JSONResponse:
        return JSONResponse({route: state.stats[route].describe() for route in ROUTES})

    async def reset_calls(request: Request) -> JSONResponse:
        state.reset_calls()
        return JSONResponse({route: state.stats[route].describe() for route in ROUTES})

    async def get_chats(request: Request) -> JSONResponse:
        return JSONResponse({"chats": list(state.chats)})

    def latency() -> dict[str, Any]:
        return {"base_ms": state.base_latency_ms, "routes": dict(state.route_latency_ms)}

    async def get_latency(request: Request) -> JSONResponse:
        return JSONResponse(latency())

    async def set_latency(request: Request) -> Response:
        body = await read_json(request)
        if body is None:
            return invalid("the body is too large")
        try:
            update = LatencyUpdate.model_validate_json(body)
        except ValidationError as error:
            return invalid('latency is {"chat": 250, "transcribe": 0, "speech": 1000} (ms)', problems(error))
        for route in ROUTES:
            value = getattr(update, route)
            if value is not None:
                state.route_latency_ms[route] = value
        return JSONResponse(latency())

    async def reset(request: Request) -> JSONResponse:
        state.clear_faults()
        state.reset_calls()
        state.route_latency_ms = dict.fromkeys(ROUTES, 0)
        reset_budgets()
        return JSONResponse({"reset": ["faults", "calls", "latency", "rate_limits"]})

    return [
        Route("/_sim/health", get_health, methods=["GET"]),
        Route("/_sim/faults", add_faults, methods=["POST"]),
        Route("/_sim/faults", list_faults, methods=["GET"]),
        Route("/_sim/faults", clear_faults, methods=["DELETE"]),
        Route("/_sim/calls", get_calls, methods=["GET"]),
        Route("/_sim/calls", reset_calls, methods=["DELETE"]),
        Route("/_sim/chats", get_chats, methods=["GET"]),
        Route("/_sim/latency", get_latency, methods=["GET"]),
        Route("/_sim/latency", set_latency, methods=["PUT"]),
        Route("/_sim/reset", reset, methods=["POST"]),
    ]
