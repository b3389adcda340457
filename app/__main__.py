"""`python -m app`: validate the configuration, then serve the internal app.

Everything the process creates is owner-only (umask 077; see `app.storage.data_dir`), and
every log line - Python warnings included - passes through the capability-id redaction
of `app.observability`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType

import uvicorn

from app.observability import RedactCapabilities
from app.outbound import OutboundSettings
from app.settings import AppSettings, load_settings
from app.storage.data_dir import become, restrict_umask
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
    # qdrant-client warns with collection names, which hold session ids: into the log, redacted.
    logging.captureWarnings(True)
    try:
        settings, outbound_settings = load_configuration()
    except ConfigurationError as error:
        print(f"app: {error}", file=sys.stderr)
        return 2
    if settings.run_as_user is not None:
        become(settings.run_as_user, settings.data_dir)  # before anything is opened there
    # numpy's BLAS would spread every vector search over all cores and busy-wait on them
    # (measured: twice the CPU for the same time); an async server wants one thread.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from app.main import create_app  # after the line above: it imports numpy

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
        log_config=report_logged_errors(
            log_config(settings.log_level.value, {"redact_capabilities": RedactCapabilities}), settings
        ),
        # Longer than a turn may take, so a turn under way when SIGTERM comes finishes
        # and its memory write is not lost.
        timeout_graceful_shutdown=settings.drain_timeout,
    )
    sockets = [dual_stack_socket(settings.port)] if settings.host == ALL_ADDRESSES_V6 else None
    uvicorn.Server(config).run(sockets=sockets)
    return 0


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    return None


if __name__ == "__main__":
    sys.exit(main())
