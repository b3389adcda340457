"""Runs the edge on uvicorn with the edge's own HTTP protocol: one process or several
workers, with a graceful drain; and, with `EDGE_METRICS_PORT`, `/metrics` on that port:
from the one process, or from the supervisor, adding up its workers' (common/metrics.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from common.logs import log_config
from common.metrics import MULTIPROCESS_DIRECTORY, process_registry, serve_metrics, supervisor_registry
from edge.app import build_app
from edge.concerns.security_headers import API_CONTENT_SECURITY_POLICY, NO_REFERRER, preset
from edge.policy import Policy
from edge.server.config import EdgeServerConfig, ServerLimits
from edge.server.metrics import DRAIN_REQUESTS, SERVER_REFUSALS
from edge.settings import EdgeSettings

# Body bytes that may arrive in the same reads as a request head (uvloop reads 256 KiB).
HEAD_READ_ALLOWANCE = 512 * 1024


def server_limits(settings: EdgeSettings) -> ServerLimits:
    return ServerLimits(
        header_timeout=settings.client_header_timeout,
        keep_alive_timeout=settings.client_keep_alive_timeout,
        body_timeout=settings.client_body_timeout,
        body_min_rate=settings.client_body_min_rate,
        write_timeout=settings.client_write_timeout,
        max_head_bytes=settings.max_header_bytes + HEAD_READ_ALLOWANCE,
        max_connections_per_client=settings.max_connections_per_client,
        trusted_proxies=tuple(settings.trusted_proxies),
        refusal_headers=preset(API_CONTENT_SECURITY_POLICY, settings.hsts_max_age, NO_REFERRER),
    )


def server_config(settings: EdgeSettings, app: Any, **options: Any) -> EdgeServerConfig:
    """uvicorn's configuration for the edge; `options` for what the caller decides (the
    tests bind their own sockets)."""
    defaults: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "ws_max_size": settings.ws_max_message_bytes,
        "lifespan": "on",
        # The edge resolves clients itself, through EDGE_TRUSTED_PROXIES only.
        "proxy_headers": False,
        "server_header": False,
        "date_header": True,
        "access_log": False,
        "log_config": log_config(settings.log_level.value),
        "timeout_graceful_shutdown": settings.drain_timeout,
    }
    return EdgeServerConfig(app, server_limits(settings), **(defaults | options))


def serve(settings: EdgeSettings, policy: Policy) -> None:
    # uvicorn re-raises the signal that stopped it once it has drained; a handler of our
    # own turns that into a normal exit (status 0) instead of death by signal.
    signal.signal(signal.SIGTERM, _exit_quietly)
    signal.signal(signal.SIGINT, _exit_quietly)
    if settings.workers == 1:
        registry = process_registry() if settings.metrics_port is not None else None
        if registry is not None:
            registry.register(SERVER_REFUSALS)
            registry.register(DRAIN_REQUESTS)
        server = uvicorn.Server(server_config(settings, build_app(settings, policy, registry=registry)))
        with _metrics_served(settings, registry):
            server.run()
        if not server.started:
            sys.exit(STARTUP_FAILURE)
        return
    with tempfile.TemporaryDirectory(prefix="edge-metrics-") as directory:
        # Read by prometheus-client when each worker imports it: their values go to files.
        os.environ[MULTIPROCESS_DIRECTORY] = directory
        # Each worker builds its own application from the same environment.
        config = server_config(settings, "edge.app:create_app", factory=True, workers=settings.workers)
        with _metrics_served(settings, supervisor_registry(Path(directory))):
            Multiprocess(config, sockets=[config.bind_socket()]).run()


@contextlib.contextmanager
def _metrics_served(settings: EdgeSettings, registry: CollectorRegistry | None) -> Iterator[None]:
    if settings.metrics_port is None or registry is None:
        yield
        return
    server = serve_metrics(registry, settings.host, settings.metrics_port)
    try:
        yield
    finally:
        server.close()


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    return None
