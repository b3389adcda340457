"""The alerting rules (ops/prometheus/rules/), their runbooks (docs/runbooks/) and the example
Alertmanager configuration (ops/alertmanager/alertmanager.yml), with the real tools:
Prometheus's `promtool` checks every rules file and runs every rules file's unit tests,
Alertmanager's `amtool` checks the configuration and routes every alert, and a real
Alertmanager applies the inhibitions. The conventions every alert keeps - a severity
Alertmanager routes, a summary, a description, a runbook with the four sections, a unit test
that sees it fire - are read from the files themselves, so a new alert is held to them.

`make test-tools` installs promtool and amtool (Debian's `prometheus` and
`prometheus-alertmanager`) as root; without them those tests are skipped, saying so."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.processes import PROJECT_ROOT
from tests.servers import closed_port, wait_until

RULES_DIR = PROJECT_ROOT / "ops" / "prometheus" / "rules"
RUNBOOKS_DIR = PROJECT_ROOT / "docs" / "runbooks"
ALERTMANAGER_CONFIG = PROJECT_ROOT / "ops" / "alertmanager" / "alertmanager.yml"
RUNBOOK_URL = "https://github.com/voice-companion/voice-companion/blob/main/docs/runbooks/{}.md"
SEVERITIES = {"page", "ticket", "none"}
SECTIONS = ["## Meaning", "## Impact", "## Diagnosis", "## Mitigation"]
RECEIVERS = {"page": "pager", "ticket": "ticket", "none": "blackhole"}
DEAD_MANS_SWITCH = ("Watchdog", "deadmans-switch")
TOOL_TIMEOUT = 120

PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="needs promtool (make test-tools installs Debian's prometheus as root)"
)
needs_amtool = pytest.mark.skipif(
    AMTOOL is None, reason="needs amtool (make test-tools installs Debian's prometheus-alertmanager as root)"
)
needs_alertmanager = pytest.mark.skipif(
    ALERTMANAGER is None,
    reason="needs Alertmanager (make test-tools installs Debian's prometheus-alertmanager as root)",
)


@dataclass(frozen=True)
class Alert:
    name: str
    file: Path
    rule: dict[str, Any]

    @property
    def severity(self) -> str:
        return str(self.rule.get("labels", {}).get("severity"))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rule_files() -> list[Path]:
    return sorted(path for path in RULES_DIR.glob("*.yml") if not path.name.endswith("_test.yml"))


def unit_test_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*_test.yml"))


def alerts() -> list[Alert]:
    return [
        Alert(rule["alert"], path, rule)
        for path in rule_files()
        for group in load_yaml(path)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def alert_names() -> list[str]:
    return sorted({alert.name for alert in alerts()})


def unit_test_cases() -> list[dict[str, Any]]:
    """Every `alert_rule_test` case of every test file."""
    return [
        case
        for path in unit_test_files()
        for test in load_yaml(path)["tests"]
        for case in test.get("alert_rule_test") or []
    ]


def run(*command: str, cwd: Path = PROJECT_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False)


def test_there_are_rules_and_unit_tests() -> None:
    # The parametrised tests below would pass vacuously on an empty directory.
    assert {"services.yml", "slo.yml"} <= {path.name for path in rule_files()}
    assert len(alert_names()) >= 13


@needs_promtool
@pytest.mark.parametrize("path", rule_files(), ids=lambda path: path.name)
def test_promtool_checks_the_rules_file(path: Path) -> None:
    result = run(str(PROMTOOL), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
@pytest.mark.parametrize("path", unit_test_files(), ids=lambda path: path.name)
def test_promtool_unit_tests_pass(path: Path) -> None:
    result = run(str(PROMTOOL), "test", "rules", path.name, cwd=path.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_fails_a_unit_test_that_expects_the_wrong_thing(tmp_path: Path) -> None:
    """The unit tests can fail: the services' tests with one expected label changed do."""
    (tmp_path / "services.yml").write_text((RULES_DIR / "services.yml").read_text())
    tests = (RULES_DIR / "services_test.yml").read_text()
    assert tests.count("provider: groq") >= 1
    (tmp_path / "services_test.yml").write_text(tests.replace("provider: groq", "provider: elevenlabs"))
    result = run(str(PROMTOOL), "test", "rules", "services_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


@pytest.mark.parametrize("path", rule_files(), ids=lambda path: path.name)
def test_every_rules_file_has_a_test_file(path: Path) -> None:
    tests = path.with_name(f"{path.stem}_test.yml")
    assert tests.exists(), f"{path.name} has no {tests.name}"
    assert path.name in load_yaml(tests)["rule_files"]


@pytest.mark.parametrize("alert", alerts(), ids=lambda alert: f"{alert.name}-{alert.severity}")
def test_every_alert_has_a_severity_summary_description_and_runbook(alert: Alert) -> None:
    assert alert.severity in SEVERITIES
    annotations = alert.rule.get("annotations", {})
    assert str(annotations.get("summary", "")).strip()
    assert str(annotations.get("description", "")).strip()
    assert annotations.get("runbook_url") == RUNBOOK_URL.format(alert.name)


@pytest.mark.parametrize("name", alert_names())
def test_every_alert_has_a_runbook_with_the_four_sections(name: str) -> None:
    runbook = RUNBOOKS_DIR / f"{name}.md"
    assert runbook.exists(), f"no runbook for {name}"
    text = runbook.read_text()
    assert text.startswith(f"# {name}\n")
    headings = re.findall(r"^## .+$", text, re.MULTILINE)
    assert headings == SECTIONS, f"{runbook.name}: {headings}"
    for section in re.split(r"^## .+$", text, flags=re.MULTILINE)[1:]:
        assert section.strip(), f"{runbook.name} has an empty section"


def test_the_runbook_index_lists_every_alert_and_nothing_else() -> None:
    index = (RUNBOOKS_DIR / "README.md").read_text()
    assert sorted(set(re.findall(r"\]\((\w+)\.md\)", index))) == alert_names()
    pages = sorted(path.stem for path in RUNBOOKS_DIR.glob("*.md") if path.name != "README.md")
    assert pages == alert_names(), "a runbook without an alert, or an alert without a runbook"


@pytest.mark.parametrize("name", alert_names())
def test_every_alert_is_seen_firing_and_quiet_by_a_unit_test(name: str) -> None:
    cases = [case for case in unit_test_cases() if case["alertname"] == name]
    firing = [case for case in cases if case.get("exp_alerts")]
    assert firing, f"no unit test sees {name} fire"
    for case in firing:
        for expected in case["exp_alerts"]:
            assert expected["exp_labels"]["severity"] in SEVERITIES
            assert set(expected["exp_annotations"]) == {"summary", "description", "runbook_url"}
    if any("for" in alert.rule for alert in alerts() if alert.name == name):
        assert any(not case.get("exp_alerts") for case in cases), f"no unit test sees {name} quiet"


@needs_amtool
def test_amtool_checks_the_alertmanager_config() -> None:
    result = run(str(AMTOOL), "check-config", str(ALERTMANAGER_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def receiver_of(*labels: str) -> str:
    result = run(str(AMTOOL), "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}", *labels)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


@needs_amtool
@pytest.mark.parametrize("alert", alerts(), ids=lambda alert: f"{alert.name}-{alert.severity}")
def test_every_alert_reaches_the_receiver_of_its_severity(alert: Alert) -> None:
    expected = DEAD_MANS_SWITCH[1] if alert.name == DEAD_MANS_SWITCH[0] else RECEIVERS[alert.severity]
    assert receiver_of(f"alertname={alert.name}", f"severity={alert.severity}", "job=app") == expected


@needs_amtool
def test_an_alert_without_a_known_severity_is_not_dropped() -> None:
    assert receiver_of("alertname=Unexpected") == "ticket"
    assert receiver_of("alertname=Unexpected", "severity=critical") == "ticket"


def test_notifications_are_grouped_and_not_repeated_every_minute() -> None:
    config = load_yaml(ALERTMANAGER_CONFIG)
    route = config["route"]
    assert route["group_by"] == ["alertname", "job", "provider"]
    for child in route["routes"]:
        receiver = child["receiver"]
        repeat = child.get("repeat_interval", route["repeat_interval"])
        if receiver == DEAD_MANS_SWITCH[1]:
            assert repeat == "1m"  # the switch wants a heartbeat
        elif receiver != "blackhole":
            assert repeat in {"1h", "4h", "12h", "24h"}, f"{receiver} repeats every {repeat}"
    urls = [hook["url"] for receiver in config["receivers"] for hook in receiver.get("webhook_configs", [])]
    assert urls
    assert all(re.fullmatch(r"http://[a-z-]+\.example\.internal/[\w/]+", url) for url in urls), urls


class WebhookSink(ThreadingHTTPServer):
    """Alertmanager's webhook notifications, by path."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), WebhookHandler)
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def paths(self) -> list[str]:
        with self.lock:
            return [path for path, _ in self.received]


class WebhookHandler(BaseHTTPRequestHandler):
    server: WebhookSink

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class RunningAlertmanager:
    url: str
    sink: WebhookSink


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[RunningAlertmanager]:
    """The example configuration in a real Alertmanager on loopback, clustering off, its
    webhooks pointed at a local sink instead of the placeholder hosts."""
    sink = WebhookSink()
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    sink_url = f"http://127.0.0.1:{sink.server_address[1]}"
    config = tmp_path / "alertmanager.yml"
    config.write_text(re.sub(r"http://[a-z-]+\.example\.internal", sink_url, ALERTMANAGER_CONFIG.read_text()))
    port = closed_port()
    log = (tmp_path / "alertmanager.log").open("w")
    process = subprocess.Popen(
        [
            str(ALERTMANAGER),
            f"--config.file={config}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: ready(url), timeout=30, interval=0.1), (tmp_path / "alertmanager.log").read_text()
        yield RunningAlertmanager(url, sink)
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
        sink.shutdown()
        sink.server_close()


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def post_alerts(url: str, alerts: list[dict[str, str]]) -> None:
    body = json.dumps([{"labels": labels} for labels in alerts]).encode()
    request = urllib.request.Request(
        f"{url}/api/v2/alerts", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def alert_states(url: str) -> dict[tuple[str, str, str, str], str]:
    """(alertname, severity, job, instance) -> active or suppressed."""
    with urllib.request.urlopen(f"{url}/api/v2/alerts", timeout=10) as response:
        alerts = json.load(response)
    states = {}
    for alert in alerts:
        labels = alert["labels"]
        key = (labels["alertname"], labels["severity"], labels.get("job", ""), labels.get("instance", ""))
        states[key] = alert["status"]["state"]
    return states


@needs_alertmanager
def test_alertmanager_inhibits_what_a_page_or_a_down_target_explains(alertmanager: RunningAlertmanager) -> None:
    expected = {
        # A target down: its job's NotReady is held back; another job's is not.
        ("TargetDown", "page", "app", "app:9102"): "active",
        ("NotReady", "ticket", "app", "app:9102"): "suppressed",
        ("BreakerOpen", "ticket", "app", "app:9102"): "suppressed",
        ("NotReady", "ticket", "edge", "edge:9101"): "active",
        # The page and the ticket of one alert on one process: only the page.
        ("ContainerMemoryHigh", "page", "sim", "sim:9103"): "active",
        ("ContainerMemoryHigh", "ticket", "sim", "sim:9103"): "suppressed",
        ("ContainerMemoryHigh", "ticket", "edge", "edge:9101"): "active",
        # The fast burn covers the slow burn of the same budget.
        ("ErrorBudgetFastBurn", "page", "edge", ""): "active",
        ("ErrorBudgetSlowBurn", "ticket", "edge", ""): "suppressed",
    }
    post_alerts(
        alertmanager.url,
        [
            {"alertname": name, "severity": severity, "job": job, **({"instance": instance} if instance else {})}
            for name, severity, job, instance in expected
        ],
    )
    assert wait_until(lambda: alert_states(alertmanager.url) == expected, timeout=15, interval=0.2), alert_states(
        alertmanager.url
    )


@needs_alertmanager
def test_the_watchdog_reaches_the_dead_mans_switch_at_once(alertmanager: RunningAlertmanager) -> None:
    post_alerts(alertmanager.url, [{"alertname": "Watchdog", "severity": "none"}])
    assert wait_until(lambda: "/v1/ping" in alertmanager.sink.paths(), timeout=15, interval=0.1)
    with alertmanager.sink.lock:
        path, body = alertmanager.sink.received[0]
    assert path == "/v1/ping"
    assert body["receiver"] == "deadmans-switch"
    assert [alert["labels"]["alertname"] for alert in body["alerts"]] == ["Watchdog"]
