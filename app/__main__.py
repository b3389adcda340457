"""`python -m app`: validate the configuration, then serve the internal app.

Everything the process creates is owner-only (umask 077; see `app.storage.data_dir`); the
process holds its data directory and checks its database before it serves (exit status 3
when another process holds it or the database is corrupt: app/storage/restore.py); and
every log line - Python warnings included - passes through the capability-id redaction
of `app.observability`.
"""

from __future__ import annotations

import logging
import logging.config
import os
import signal
import sys
from types import FrameType

import uvicorn

from app.observability import RedactCapabilities
from app.outbound import OutboundSettings
from app.settings import AppSettings, load_settings
from app.storage.backup import BackupError
from app.storage.data_dir import DataDirInUse, become, claim, restrict_umask
from app.storage.restore import CorruptDatabase, check_at_start
from common.error_tracking import report_logged_errors
from common.listen import ALL_ADDRESSES_V6, dual_stack_socket
from common.logs import log_config
from common.settings import ConfigurationError, load


def load_configuration() -> tuple[AppSettings, OutboundSettings]:
    """Everything the app validates before it serves (`make run` checks it first too);
    `ConfigurationError` names what is wrong."""
    return load_settings(), load(OutboundSettings)


def main() -> int:
    restrict_umask()  # before anything is created
    # numpy's BLAS would spread every vector search over all cores and busy-wait on them
    # (measured: twice the CPU for the same time); an async server wants one thread.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # qdrant-client warns with collection names, which hold session ids: into the log, redacted.
    logging.captureWarnings(True)
    try:
        settings, outbound_settings = load_configuration()
    except ConfigurationError as error:
        print(f"app: {error}", file=sys.stderr)
        return 2
    if settings.run_as_user is not None:
        become(settings.run_as_user, settings.data_dir, settings.backups)  # before anything is opened there
    logs = report_logged_errors(
        log_config(settings.log_level.value, {"redact_capabilities": RedactCapabilities}), settings
    )
    logging.config.dictConfig(logs)  # now, for what the data's check says; uvicorn applies it again
    try:
        # Held until the process ends: one app process per SQLite database and embedded Qdrant,
        # and no restore under a running app (app/storage/data_dir.py).
        held = claim(settings.data_dir) if settings.keeps_data_locally else None
        check_at_start(settings)
    except (DataDirInUse, CorruptDatabase, BackupError) as error:
        print(f"app: {error}", file=sys.stderr)
        return 3
    from app.main import create_app  # after the line above: it imports numpy
    from app.memory.embedding import EmbedderUnavailable, embedder_named

    if settings.feature_memory:
        try:
            embedder_named(settings.memory_embedder)  # loaded and warmed up before the app serves
        except EmbedderUnavailable as error:
            print(f"app: {error}", file=sys.stderr)
            return 2

    # uvicorn re-raises the signal that stopped it once it has drained; a handler of our
    # own turns that into a normal exit (status 0).
    signal.signal(signal.SIGTERM, _exit_quietly)
    signal.signal(signal.SIGINT, _exit_quietly)
    config = uvicorn.Config(
        create_app(settings, outbound_settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        proxy_headers=False,  # the edge resolves clients; the app does not need them
        server_header=False,
        access_log=False,
        log_config=logs,
        # Longer than a turn may take, so a turn under way when SIGTERM comes finishes
        # and its memory write is not lost.
        timeout_graceful_shutdown=settings.drain_timeout,
    )
    sockets = [dual_stack_socket(settings.port)] if settings.host == ALL_ADDRESSES_V6 else None
    uvicorn.Server(config).run(sockets=sockets)
    if held is not None:
        held.close()
    return 0


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    return None


if __name__ == "__main__":
    sys.exit(main())
