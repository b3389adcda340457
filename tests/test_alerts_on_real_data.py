"""The project's alerting rules on real data: Debian's Prometheus scrapes a stack started
like `make run` on loopback and evaluates ops/prometheus/rules/ (docs/metrics.md).

The rules are the shipped ones but for their `for:` durations, shortened to seconds so
that pending-then-firing takes seconds here; `promtool test rules` checks the durations
themselves (tests/test_alert_rules.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from common.redaction import CAPABILITY_LIKE
from tests.app_support import new_port
from tests.processes import PROJECT_ROOT
from tests.servers import wait_until
from tests.test_run_stack import Stack, started_stack

PROMETHEUS = shutil.which("prometheus")
RULES = PROJECT_ROOT / "ops" / "prometheus" / "rules"
TURN_LIMIT = 'rate_limit = "10/minute;200/day"'
TURNS = "/api/v1/sessions/{session_id}/turns"

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="needs Debian's prometheus (make test-tools installs it as root)"
)


@dataclass
class Monitored:
    stack: Stack
    prometheus: str

    def query(self, expression: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expression}, timeout=5).json()
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def alert_states(self) -> dict[str, str]:
        alerts = httpx.get(f"{self.prometheus}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
        return {alert["labels"]["alertname"]: alert["state"] for alert in alerts}


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitored]:
    directory = tmp_path_factory.mktemp("alerts")
    policy = directory / "edge-policy.toml"
    shipped = (PROJECT_ROOT / "config" / "edge-policy.toml").read_text()
    assert TURN_LIMIT in shipped
    policy.write_text(shipped.replace(TURN_LIMIT, 'rate_limit = "1000/minute"'))
    ports = {name: new_port() for name in ("EDGE_METRICS_PORT", "APP_METRICS_PORT", "SIM_METRICS_PORT")}
    environment = {name: str(port) for name, port in ports.items()}
    with started_stack(directory, EDGE_POLICY_FILE=str(policy), **environment) as stack:
        rules = []
        for source in sorted(RULES.glob("*.yml")):
            if source.stem.endswith("_test"):
                continue
            copy = directory / source.name
            copy.write_text(re.sub(r"(?m)^(\s+)for: \S+$", r"\1for: 5s", source.read_text()))
            rules.append(str(copy))
        targets = {job: ports[f"{job.upper()}_METRICS_PORT"] for job in ("edge", "app", "sim")}
        jobs = "\n".join(
            f"  - job_name: {job}\n    static_configs: [{{targets: ['127.0.0.1:{port}']}}]"
            for job, port in targets.items()
        )
        config = directory / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{', '.join(rules)}]\n"
            f"scrape_configs:\n{jobs}\n"
        )
        port = new_port()
        assert PROMETHEUS is not None
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(directory / "prometheus.log").open("w"),
        )
        try:
            url = f"http://127.0.0.1:{port}"
            assert wait_until(lambda: _answers(f"{url}/-/ready"), timeout=30), (
                directory / "prometheus.log"
            ).read_text()
            yield Monitored(stack, url)
        finally:
            process.terminate()
            process.wait(30)


def test_after_a_few_turns_the_series_exist_with_route_templates_as_labels(monitored: Monitored) -> None:
    with httpx.Client(base_url=monitored.stack.edge_url, timeout=30, trust_env=False) as client:
        session_id = client.post("/api/v1/sessions").json()["session_id"]
        for text in ("Hello!", "My sister lives in Paris.", "What do you remember about me?"):
            assert client.post(f"/api/v1/sessions/{session_id}/turns", json={"text": text}).status_code == 200

    edge_turns = 'http_server_request_duration_seconds_count{job="edge",http_route="/api/v1/sessions/*/turns"}'

    expected = (
        'app_turns_total{job="app",kind="text",outcome="ok"} >= 3',
        f"sum({edge_turns}) >= 3",
        f'sum(http_server_request_duration_seconds_count{{job="app",http_route="{TURNS}"}}) >= 3',
        # Each target is scraped on its own schedule: the simulator's series may land a
        # scrape after the app's and the edge's.
        'http_server_request_duration_seconds_count{job="sim"}',
    )

    def scraped() -> bool:
        return all(monitored.query(expression) for expression in expected)

    assert wait_until(scraped, timeout=20, interval=0.2), [(e, monitored.query(e)) for e in expected]
    routes = httpx.get(f"{monitored.prometheus}/api/v1/label/http_route/values", timeout=5).json()["data"]
    assert TURNS in routes
    assert not [route for route in routes if CAPABILITY_LIKE.search(route) or session_id in route], routes
    assert monitored.query('up{job="app"} == 1')
    assert monitored.query('readiness_status{job="app"} == 1')
    assert "Watchdog" in monitored.alert_states()
    assert monitored.alert_states()["Watchdog"] == "firing"


def test_a_failing_language_model_makes_the_breaker_and_error_budget_alerts_pending_then_firing(
    monitored: Monitored,
) -> None:
    sim = monitored.stack.sim_url
    httpx.post(f"{sim}/_sim/reset", timeout=5).raise_for_status()
    fault = httpx.post(f"{sim}/_sim/faults", json={"route": "chat", "status": 500, "times": -1}, timeout=5)
    assert fault.status_code == 201, fault.text
    seen: dict[str, list[str]] = {"BreakerOpen": [], "ErrorBudgetFastBurn": []}
    try:
        with httpx.Client(base_url=monitored.stack.edge_url, timeout=30, trust_env=False) as client:
            session_id = client.post("/api/v1/sessions").json()["session_id"]
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                turn = client.post(f"/api/v1/sessions/{session_id}/turns", json={"text": "Are you there?"})
                assert turn.status_code == 503, turn.text
                assert turn.json()["error"]["code"] == "reply_unavailable"
                states = monitored.alert_states()
                for name, history in seen.items():
                    state = states.get(name, "inactive")
                    if not history or history[-1] != state:
                        history.append(state)
                if all(history[-1:] == ["firing"] for history in seen.values()):
                    break
                time.sleep(0.5)
    finally:
        httpx.post(f"{sim}/_sim/reset", timeout=5).raise_for_status()
    for name, history in seen.items():
        assert history[-1:] == ["firing"], (name, history)
        assert "pending" in history, (name, history)  # its `for:` held it back first
    breaker = next(
        alert
        for alert in httpx.get(f"{monitored.prometheus}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
        if alert["labels"]["alertname"] == "BreakerOpen"
    )
    assert breaker["labels"]["provider"] == "groq"
    assert breaker["annotations"]["runbook_url"].endswith("/docs/runbooks/BreakerOpen.md")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False
