"""`APP_HOST=::` (an IPv6-only private network, docs/deployment.md) serves IPv4 clients too:
the app process listens on one dual-stack socket (common/listen.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.app_support import API, Simulators, app_environment, app_process, new_port, start_simulators


@pytest.fixture
def sims() -> Iterator[Simulators]:
    running = start_simulators()
    yield running
    running.stop()


def test_the_app_on_all_ipv6_addresses_answers_ipv4_and_ipv6_clients(sims: Simulators, tmp_path: Path) -> None:
    port = new_port()
    env = app_environment(sims, tmp_path / "data", port, APP_HOST="::")
    with app_process(tmp_path / "logs", env), httpx.Client(trust_env=False, timeout=5) as client:
        for origin in (f"http://127.0.0.1:{port}", f"http://[::1]:{port}"):
            assert client.get(f"{origin}{API}/health").json() == {"status": "alive"}, origin
