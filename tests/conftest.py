from __future__ import annotations

import os

# Before numpy is first imported (the memory store's embedder): one BLAS thread, as
# `python -m app` runs it; more spin on a shared machine (docs/app.md#the-embedder).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from collections.abc import Iterator

import httpx
import pytest

from tests.app_support import Simulators, start_simulators
from tests.servers import RawUpstream, RunningEdge, ServerThread, UpstreamApp, start_edge, start_upstream
from tests.sim_support import client, start_sim

# The developer's own environment must not change what the tests see.
for _name in list(os.environ):
    if _name.startswith(("EDGE_", "APP_", "SIM_", "OTEL_", "GROQ_", "ELEVENLABS_")) or _name in ("PORT", "ENVIRONMENT"):
        del os.environ[_name]


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[tuple[ServerThread, UpstreamApp]]:
    server, app = start_upstream()
    yield server, app
    server.stop()


@pytest.fixture(scope="session")
def upstream_url(upstream_server: tuple[ServerThread, UpstreamApp]) -> str:
    return upstream_server[0].url


@pytest.fixture(scope="session")
def upstream(upstream_server: tuple[ServerThread, UpstreamApp]) -> UpstreamApp:
    return upstream_server[1]


@pytest.fixture(scope="session")
def edge(upstream_server: tuple[ServerThread, UpstreamApp]) -> Iterator[RunningEdge]:
    running = start_edge(upstream_server[0].url)
    yield running
    running.server.stop()


@pytest.fixture(scope="session")
def raw_upstream() -> Iterator[RawUpstream]:
    server = RawUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def raw_edge(raw_upstream: RawUpstream) -> Iterator[RunningEdge]:
    running = start_edge(raw_upstream.url, upstream_read_timeout=2.0)
    yield running
    running.server.stop()


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[ServerThread, UpstreamApp]]:
    """An upstream of the test module's own, whose record holds only that module's requests."""
    server, app = start_upstream()
    yield server, app
    server.stop()


@pytest.fixture(scope="module")
def sims() -> Iterator[Simulators]:
    """Both providers' simulators (`python -m sim`), one pair per test module."""
    running = start_simulators()
    yield running
    running.stop()


@pytest.fixture
def fresh_sims(sims: Simulators) -> Iterator[None]:
    """The simulators as started - healthy, counts at zero, no latency - for the test, and
    left so for the next (`pytest.mark.usefixtures("fresh_sims")` on a module)."""
    sims.reset()
    yield
    sims.reset()


@pytest.fixture(scope="module")
def sim_server() -> Iterator[ServerThread]:
    """One simulator (`sim.app`) on a loopback thread, per test module."""
    server = start_sim()
    yield server
    server.stop()


@pytest.fixture
def http(sim_server: ServerThread) -> Iterator[httpx.Client]:
    """A client of `sim_server`, whose faults, latency and counts start from nothing."""
    with client(sim_server) as http_client:
        assert http_client.post("/_sim/reset").status_code == 200
        yield http_client
