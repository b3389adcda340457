"""The simulator application: the provider routes, the `/_sim/` API, and 404s that look like
the provider's own, so a client that gets a path wrong sees what it would see for real.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from common.envelope import envelope
from common.metrics import RequestDurationMiddleware, process_registry, request_duration, route_template, serve_metrics
from sim.control import control_routes
from sim.elevenlabs import ElevenLabs
from sim.groq import Groq
from sim.logs import AccessLog
from sim.pipeline import SimState
from sim.settings import SimSettings

logger = logging.getLogger("sim")


def not_routed(request: Request, status: int) -> Response:
    """404 or 405 in the words of whichever API the path belongs to."""
    path = request.url.path
    if path.startswith("/openai/"):
        message = (
            f"Unknown request URL: {request.method} {path}. Please check the URL for typos, "
            "or see the docs at https://console.groq.com/docs/"
        )
        code = "unknown_url" if status == 404 else "method_not_allowed"
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": code}}, status)
    if path.startswith("/v1/"):
        return JSONResponse({"detail": "Not Found" if status == 404 else "Method Not Allowed"}, status)
    code = "not_found" if status == 404 else "method_not_allowed"
    message = "There is nothing at this path." if status == 404 else "This method is not allowed here."
    return Response(envelope(code, message, None), status, media_type="application/json")


async def http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    if error.status_code in (404, 405):
        return not_routed(request, error.status_code)
    message = error.detail if isinstance(error.detail, str) else "The request failed."
    return Response(envelope("http_error", message, None), error.status_code, media_type="application/json")


async def server_error(request: Request, error: Exception) -> Response:
    logger.error("unhandled error", exc_info=error)
    body = envelope("internal_error", "The simulator failed to handle the request.", None)
    return Response(body, 500, media_type="application/json")


def build_app(settings: SimSettings) -> Starlette:
    state = SimState(settings.latency_ms)
    groq = Groq(settings, state)
    elevenlabs = ElevenLabs(settings, state)
    health = {
        "speech_engine": "espeak-ng" if settings.uses_espeak else "tone",
        "mp3_encoder": "lame" if settings.uses_lame else "silent",
    }

    registry = process_registry()
    duration = request_duration(registry)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        server = serve_metrics(registry, settings.host, settings.metrics_port) if settings.metrics_port else None
        logger.info(
            "provider simulator ready",
            extra={
                **health,
                "latency_ms": settings.latency_ms,
                "profile": settings.profile.value,
                "groq_key_required": settings.groq_api_key is not None,
                "elevenlabs_key_required": settings.elevenlabs_api_key is not None,
                "elevenlabs_max_concurrent": settings.elevenlabs_max_concurrent,
            },
        )
        yield
        if server is not None:
            server.close()

    app = Starlette(
        routes=[*groq.routes(), *elevenlabs.routes(), *control_routes(state, groq.budgets.reset, health)],
        middleware=[
            Middleware(RequestDurationMiddleware, duration=duration, route_of=route_template),
            Middleware(AccessLog),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.sim = state
    app.state.groq = groq
    app.state.elevenlabs = elevenlabs
    return app
