"""`python -m sim`: validate the configuration, then serve on SIM_HOST:SIM_PORT."""

from __future__ import annotations

import signal
import sys
from types import FrameType

import uvicorn

from common.settings import ConfigurationError
from sim.app import build_app
from sim.logs import log_config
from sim.settings import SimSettings, load_settings

# A call held by a long simulated delay must not hold up a restart for long.
GRACEFUL_SHUTDOWN_SECONDS = 5


def load_configuration() -> SimSettings:
    """Everything the simulator validates before it serves (`make run` checks it first
    too); `ConfigurationError` names what is wrong."""
    return load_settings()


def main() -> int:
    try:
        settings = load_configuration()
    except ConfigurationError as error:
        print(f"sim: {error}", file=sys.stderr)
        return 2
    # uvicorn re-raises the signal that stopped it once it has drained; handlers of our own
    # turn that into a normal exit (status 0) instead of death by signal.
    signal.signal(signal.SIGTERM, _exit_quietly)
    signal.signal(signal.SIGINT, _exit_quietly)
    uvicorn.run(
        build_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        server_header=False,
        access_log=False,
        log_config=log_config(settings.log_level.value),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    return 0


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    return None


if __name__ == "__main__":
    sys.exit(main())
