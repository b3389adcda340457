"""The companion and everything it stands on, opened in order and closed in reverse: the
outbound transport and the provider clients on it, the memory store (only with
APP_FEATURE_MEMORY on; a failure here only degrades turns), the conversation
checkpointer and the reply audio (`app.storage.stores`), the turn graph. The app's
lifespan opens it once per process; so does `python -m app.ops` for what it does
through the companion (the sweep).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from opentelemetry.trace import Tracer
from qdrant_client import AsyncQdrantClient

from app.companion import Companion
from app.memory.embedding import embedder_named
from app.memory.store import EmbedderMismatch, MemoryStore, MemoryUnavailable
from app.metrics import AppMetrics
from app.outbound import Outbound, OutboundSettings
from app.outbound.telemetry import OutboundMetrics
from app.providers.elevenlabs import ElevenLabs
from app.providers.groq import Groq
from app.settings import AppSettings
from app.storage.stores import open_stores
from app.workflow.graph import build_graph
from app.workflow.state import Services

logger = logging.getLogger("app")


@asynccontextmanager
async def open_companion(
    settings: AppSettings,
    outbound_settings: OutboundSettings,
    tracer: Tracer,
    metrics: AppMetrics,
    outbound_metrics: OutboundMetrics,
) -> AsyncIterator[tuple[Companion, Outbound]]:
    outbound = Outbound(outbound_settings, tracer=tracer, metrics=outbound_metrics)
    memory: MemoryStore | None = None
    try:
        groq = Groq(
            outbound.client("groq", settings.groq_base_url, headers=_bearer(settings)),
            tokens=metrics.groq_tokens,
            audio_seconds=metrics.groq_audio_seconds,
        )
        elevenlabs = ElevenLabs(
            outbound.client("elevenlabs", settings.elevenlabs_base_url, headers=_xi_key(settings)),
            characters=metrics.elevenlabs_characters,
        )
        # Memory off: no Qdrant client at all, embedded or server.
        memory = await _open_memory(settings, outbound) if settings.feature_memory else None
        async with open_stores(settings) as stores:
            services = Services(settings=settings, groq=groq, elevenlabs=elevenlabs, memory=memory, audio=stores.audio)
            companion = Companion(
                build_graph(stores.checkpoints.saver), stores.checkpoints, services, outbound.named_states, metrics
            )
            yield companion, outbound
    finally:
        await outbound.aclose()
        if memory is not None:
            await memory.client.close()


def qdrant_server_client(settings: AppSettings, outbound: Outbound) -> httpx.AsyncClient | None:
    """A client of the Qdrant server on the shared transport, when one keeps the memories: for
    what qdrant-client does not offer (downloading a snapshot)."""
    if not settings.feature_memory or settings.qdrant_url is None:
        return None
    key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
    return outbound.client("qdrant", settings.qdrant_url, headers={"api-key": key} if key else None)


def _bearer(settings: AppSettings) -> dict[str, str]:
    key = settings.groq_api_key.get_secret_value() if settings.groq_api_key else ""
    return {"authorization": f"Bearer {key}"}


def _xi_key(settings: AppSettings) -> dict[str, str]:
    return {"xi-api-key": settings.elevenlabs_api_key.get_secret_value() if settings.elevenlabs_api_key else ""}


async def _open_memory(settings: AppSettings, outbound: Outbound) -> MemoryStore:
    # Loaded once per process (`python -m app` has loaded it before it serves).
    embedder = await asyncio.to_thread(embedder_named, settings.memory_embedder)
    memory = MemoryStore(
        _qdrant(settings, outbound),
        embedder,
        duplicate_similarity=settings.memory_duplicate_similarity,
        server=settings.qdrant_url is not None,
    )
    try:
        await memory.setup()
    except MemoryUnavailable:
        logger.warning("memory store unavailable at start-up; turns go without memories until it is back")
    except EmbedderMismatch as refusal:
        memory.refuse(str(refusal))
        logger.error("memory store refused: %s; turns go without memories", refusal)
    return memory


def _qdrant(settings: AppSettings, outbound: Outbound) -> AsyncQdrantClient:
    if settings.qdrant_url is None:
        # Embedded: no server, files under the data directory, one process at a time.
        return AsyncQdrantClient(path=str(settings.data_dir / "qdrant"))
    api_key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
    # Its REST calls go through the shared transport like every other outbound call.
    return AsyncQdrantClient(
        url=settings.qdrant_url,
        api_key=api_key,
        # No version call at start-up: the store may be down then, and turns degrade anyway.
        check_compatibility=False,
        **outbound.httpx_kwargs("qdrant", settings.qdrant_url),
    )
