"""The internal app: FastAPI around the turn workflow, wired to its stores and providers.

Start-up makes the data directory owner-only (`app.storage.data_dir`) and opens the
companion with everything it stands on (`app.wiring`); then the hourly retention sweep,
the readiness sampler, the backups (`app.storage.backup_job`) and, with APP_METRICS_PORT,
the metrics server. Shutdown closes
them in reverse, after uvicorn has let in-flight turns finish. Only the spelling of a path
that the API lists is answered: the other (with or without a trailing slash) is a 404,
never a redirect. HEAD is answered wherever GET is, and a method nothing implements is
501 (`app.api.methods`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api import docs as api_docs
from app.api.docs import OPENAPI_URL, build_docs
from app.api.errors import install_error_handlers
from app.api.methods import RequestMethods
from app.api.routes import MULTIPART_ALLOWANCE, router
from app.api.uploads import keep_uploads_in_memory
from app.companion import Companion
from app.memory.store import EmbedderMismatch, MemoryStore, MemoryUnavailable
from app.metrics import AppMetrics, BreakerStates
from app.observability import RequestContextMiddleware
from app.outbound import OutboundSettings
from app.outbound.telemetry import OutboundMetrics
from app.page import routes as page
from app.page.assets import build_page
from app.settings import AppSettings
from app.storage import data_dir
from app.storage.backup_job import back_up_periodically
from app.wiring import open_companion, qdrant_server_client
from common.error_tracking import ReportUnhandledErrors, init_error_tracking
from common.metrics import RequestDurationMiddleware, process_registry, route_template, serve_metrics
from common.telemetry import configure_telemetry

logger = logging.getLogger("app")

SWEEP_INTERVAL_S = 3600.0
READINESS_SAMPLE_S = 10.0
RE_EMBED_RETRY_S = 300.0


def create_app(settings: AppSettings, outbound_settings: OutboundSettings) -> FastAPI:
    # Logged errors reach Sentry through `python -m app`'s log configuration (app/__main__.py).
    error_tracking = init_error_tracking(settings, "app", log_events=False)
    telemetry = configure_telemetry(settings)
    registry = process_registry()
    metrics = AppMetrics.build(registry)
    outbound_metrics = OutboundMetrics.build(registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        data_dir.secure(settings.data_dir)
        async with open_companion(settings, outbound_settings, telemetry.tracer, metrics, outbound_metrics) as opened:
            companion, outbound = opened
            app.state.companion = companion
            breakers = BreakerStates(outbound.named_states)
            registry.register(breakers)
            sweeper = asyncio.create_task(_sweep_periodically(companion))
            sampler = asyncio.create_task(_sample_readiness(companion, metrics))
            tasks = [sweeper, sampler]
            if companion.services.memory is not None:
                tasks.append(asyncio.create_task(_re_embed(companion.services.memory)))
            qdrant = qdrant_server_client(settings, outbound)
            if settings.backup_interval_hours > 0:
                tasks.append(
                    asyncio.create_task(back_up_periodically(settings, companion.checkpoints, qdrant, metrics))
                )
            metrics_server = None
            if settings.metrics_port is not None:
                metrics_server = serve_metrics(registry, settings.host, settings.metrics_port)
            # What start-up built lives as long as the process: kept out of every garbage
            # collection from now on.
            gc.collect()
            gc.freeze()
            try:
                yield
            finally:
                await companion.settled()  # the work after the last answers, before the stores close
                if metrics_server is not None:
                    metrics_server.close()
                registry.unregister(breakers)
                for task in tasks:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                if qdrant is not None:
                    await qdrant.aclose()
                telemetry.shutdown()

    docs = settings.feature_api_docs
    app = FastAPI(
        title="Voice companion",
        version="1",
        summary="A voice companion: speak, be heard, be answered, be remembered.",
        lifespan=lifespan,
        # The viewer is app/api/docs.py's: FastAPI's own loads Swagger UI from a CDN.
        docs_url=None,
        openapi_url=OPENAPI_URL if docs else None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
        # Starlette's redirect to the path with(out) its trailing slash writes an absolute
        # Location from the client's Host header; one spelling per path, the other a 404.
        redirect_slashes=False,
        # FastAPI's own telemetry (on with a global provider, or FASTAPI_OTEL_AUTO_CONFIGURE)
        # would put the raw path, ids and all, on a span of its own and export exception
        # messages unredacted; the app's server span is `app.observability`'s.
        telemetry={
            "tracing": False,
            "metrics": False,
            "logs": False,
            "operation_spans": False,
            "auto_configure": False,
        },
    )
    install_error_handlers(app)
    keep_uploads_in_memory(settings.max_audio_bytes + MULTIPART_ALLOWANCE)
    app.include_router(router)
    app.state.page = build_page(page_settings(settings))
    app.state.assets = dict(app.state.page.assets)
    app.include_router(page.router)
    if docs:
        app.state.docs = build_docs()
        app.state.assets |= app.state.docs.assets
        app.include_router(api_docs.router)
    # The API's routes, and the few FastAPI adds itself (the document and its viewer).
    routes = [*router.routes, *app.routes]
    implemented = {method for route in routes for method in getattr(route, "methods", None) or ()}
    app.add_middleware(RequestMethods, implemented=implemented)
    if error_tracking:  # inside RequestContextMiddleware, which answers an unhandled error and ends it there
        app.add_middleware(ReportUnhandledErrors)
    # Within the request's span (the next layer wraps this one), so that an observation can
    # carry its trace id; an unhandled error, which that layer answers 500, counts as a 500.
    app.add_middleware(
        RequestDurationMiddleware, duration=metrics.request_duration, route_of=route_template, exemplars=True
    )
    app.add_middleware(RequestContextMiddleware, tracer=telemetry.tracer)
    return app


def page_settings(settings: AppSettings) -> dict[str, str]:
    """What the voice page needs to know of the app before its first request."""
    return {
        "max_audio_seconds": f"{settings.max_audio_seconds:g}",
        "turn_timeout_s": f"{settings.turn_timeout_s:g}",
        "max_text_chars": str(settings.max_text_chars),
    }


async def _sample_readiness(companion: Companion, metrics: AppMetrics) -> None:
    """`/ready`'s verdict every READINESS_SAMPLE_S, for `readiness_status`."""
    while True:
        try:
            metrics.readiness.set((await companion.readiness()).database)
        except Exception:  # a check that fails is not ready; the next one tries again
            metrics.readiness.set(0)
        await asyncio.sleep(READINESS_SAMPLE_S)


async def _sweep_periodically(companion: Companion) -> None:
    while True:
        try:
            report = await companion.sweep()
            if report.sessions or report.audio:  # counts only: never a session's id
                logger.info(
                    "retention sweep",
                    extra={
                        "sessions_deleted": len(report.sessions),
                        "audio_deleted": report.audio,
                        "duration_s": round(report.seconds, 3),
                    },
                )
        except Exception:  # the sweep must outlive a bad hour; the next one retries
            logger.exception("retention sweep failed")
        await asyncio.sleep(SWEEP_INTERVAL_S)


async def _re_embed(memory: MemoryStore) -> None:
    """From start-up until done: the memories another embedder made, into the current one's
    space (docs/app.md#upgrading-the-embedder); until then they are not recalled. A pass
    that fails (the store down, a session deleted under it) is tried again later."""
    while True:
        try:
            count = await memory.re_embed()
        except EmbedderMismatch as refusal:
            memory.refuse(str(refusal))
            logger.error("memory store refused: %s; turns go without memories", refusal)
            return
        except MemoryUnavailable:
            logger.warning("re-embedding the memories of another embedder failed; trying again in 5 minutes")
            await asyncio.sleep(RE_EMBED_RETRY_S)
            continue
        if count:
            logger.info("memories re-embedded", extra={"memories": count, "embedder": memory.embedder.name})
        return
