"""The observability stack's configuration, checked as its consumers would read it
(docs/observability.md): Prometheus's config by promtool; every PromQL expression of the
dashboard (ops/grafana/dashboards/voice-companion.json) parsed by promtool, its series and
labels all in the catalogue (docs/metrics.md), its data sources the provisioned ones; the
OpenTelemetry Collector's pipelines limited first, redacted, complete and sending nowhere
but the stack; the compose profile resolved by Compose itself, every image pinned, every
service bounded, no metrics port published.

Grafana, the Collector and Jaeger cannot run here (docs/deployment.md): their files are
checked by parsing them. The promtool tests skip, saying so, when promtool is missing
(`make test-tools` installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from common.settings import OtelSettings
from tests.processes import PROJECT_ROOT
from tests.test_containers import COMPOSE_FILE, clean_environment, compose_config

OPS = PROJECT_ROOT / "ops"
PROMETHEUS_CONFIG = OPS / "prometheus" / "prometheus.yml"
COLLECTOR_CONFIG = OPS / "otel-collector" / "config.yaml"
DATASOURCES = OPS / "grafana" / "provisioning" / "datasources" / "datasources.yml"
DASHBOARD_PROVIDERS = OPS / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
DASHBOARD = OPS / "grafana" / "dashboards" / "voice-companion.json"
METRICS_DOC = PROJECT_ROOT / "docs" / "metrics.md"

PROFILE = "observability"
OBSERVABILITY_SERVICES = {"otel-collector", "prometheus", "grafana", "jaeger"}
METRICS_PORTS = {"edge": "EDGE_METRICS_PORT", "app": "APP_METRICS_PORT", "sim": "SIM_METRICS_PORT"}
DATASOURCE_UIDS = {"prometheus", "jaeger"}
# An exact release: never `latest`, a major line or a moving tag.
PINNED_IMAGE = re.compile(r"^[\w./-]+:v?\d+\.\d+\.\d+$")

PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").is_file() else None)
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="needs promtool (Debian package prometheus): `make test-tools` installs it"
)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *(str(arg) for arg in args)], capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT
    )


# -- the catalogue: docs/metrics.md --------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    kind: str
    labels: frozenset[str]


@cache
def catalogue() -> dict[str, Series]:
    """Every series of docs/metrics.md's tables, with its type and its labels (label values in
    parentheses are left out)."""
    series: dict[str, Series] = {}
    for line in METRICS_DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or set(cells[0]) <= {"-", " "} or cells[0] == "Series":
            continue
        labels = frozenset(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", cells[2])))
        for name in re.findall(r"`([a-z_:][a-z0-9_:]*)`", cells[0]):
            series[name] = Series(cells[1], labels)
    return series


# Prometheus's own, for every target.
SCRAPE_SERIES = {"up": Series("gauge", frozenset())}
TARGET_LABELS = {"job", "instance"}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def documented(name: str) -> Series | None:
    if name in SCRAPE_SERIES:
        return SCRAPE_SERIES[name]
    if name in catalogue():
        return catalogue()[name]
    for suffix in HISTOGRAM_SUFFIXES:
        base = catalogue().get(name.removesuffix(suffix))
        if name.endswith(suffix) and base is not None and base.kind == "histogram":
            labels = base.labels | {"le"} if suffix == "_bucket" else base.labels
            return Series(base.kind, labels)
    return None


def test_the_catalogue_is_read() -> None:
    # The checks below lean on this parse: a table it misread would let anything through.
    assert len(catalogue()) >= 30
    assert catalogue()["http_server_request_duration_seconds"] == Series(
        "histogram", frozenset({"http_request_method", "http_route", "http_response_status_code"})
    )
    assert catalogue()["edge_rate_limit_decisions_total"].labels == {"rule", "outcome"}
    assert catalogue()["app_sessions_expired_total"] == Series("counter", frozenset())
    assert documented("app_turn_stage_duration_seconds_bucket") == Series("histogram", frozenset({"stage", "le"}))
    assert documented("app_turns_total_bucket") is None


# -- PromQL, read just enough to name its series and labels ----------------------------------------------------

STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"(?<![\w:])([A-Za-z_:][\w:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless"}
KEYWORDS |= {"inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The series an expression selects: the identifiers left once strings, matchers, ranges
    and groupings are taken out, other than functions (followed by `(`) and keywords."""
    text = STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = GROUPING.sub(" ", text)
    return {name for name in IDENTIFIER.findall(text) if name.lower() not in KEYWORDS}


def matched_labels(expr: str) -> Iterator[tuple[str, str]]:
    """(series, label) for every label matcher of a selector."""
    for name, matchers in SELECTOR.findall(STRING.sub('""', expr)):
        for label in MATCHER.findall(matchers):
            yield name, label


def grouping_labels(expr: str) -> set[str]:
    return {label.strip() for group in GROUPING.findall(expr) for label in group.split(",") if label.strip()}


def test_the_promql_reader_finds_series_and_labels() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, http_route) (rate(http_server_request_duration_seconds_bucket{job="edge",'
        'http_route=~"/a|b{c}"}[5m]))) / ignoring (state) app_breaker_state{state="open"} or vector(0) > bool 1'
    )
    assert metric_names(expr) == {"http_server_request_duration_seconds_bucket", "app_breaker_state"}
    assert set(matched_labels(expr)) == {
        ("http_server_request_duration_seconds_bucket", "job"),
        ("http_server_request_duration_seconds_bucket", "http_route"),
        ("app_breaker_state", "state"),
    }
    assert grouping_labels(expr) == {"le", "http_route", "state"}
    assert metric_names("rate(app_turns_totl[5m])") == {"app_turns_totl"}
    assert documented("app_turns_totl") is None


# -- the dashboard ----------------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(container: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in container.get("panels", []):
        yield panel
        yield from panels(panel)


def targets() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in panels(dashboard()):
        for target in panel.get("targets", []):
            yield panel, target


def constants() -> dict[str, str]:
    return {
        variable["name"]: variable["query"]
        for variable in dashboard()["templating"]["list"]
        if variable["type"] == "constant"
    }


# What Grafana puts in place of its own variables, for a syntax check.
GRAFANA_VARIABLES = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h", "__range_s": "3600"}
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def substituted(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        known = GRAFANA_VARIABLES | constants()
        assert name in known, f"${name} is no Grafana variable nor a dashboard constant: {expr}"
        return known[name]

    return VARIABLE.sub(value, expr)


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard query, and of the Jaeger data source's span-to-metrics
    query (`$__tags` is the span's tags as matchers; `$$` is a literal `$` in provisioning)."""
    found = [
        (f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"]) for panel, target in targets()
    ]
    for source in load_yaml(DATASOURCES)["datasources"]:
        for query in source.get("jsonData", {}).get("tracesToMetrics", {}).get("queries", []):
            found.append((f"{source['name']} {query['name']}", query["query"].replace("$$__tags", 'job="edge"')))
    return found


def check_promql(tmp_path: Path, exprs: list[tuple[str, str]]) -> subprocess.CompletedProcess[str]:
    """Each expression as a recording rule of a throwaway file, through `promtool check rules`."""
    rules = [
        {"record": f"dashboard:expression_{index}", "expr": substituted(expr)} for index, (_, expr) in enumerate(exprs)
    ]
    path = tmp_path / "expressions.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return promtool("check", "rules", path)


@needs_promtool
def test_every_dashboard_expression_is_valid_promql(tmp_path: Path) -> None:
    exprs = expressions()
    assert len(exprs) > 40
    result = check_promql(tmp_path, exprs)
    listing = "\n".join(f"expression_{index}: {where}: {expr}" for index, (where, expr) in enumerate(exprs))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{listing}"
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


@needs_promtool
def test_promtool_refuses_an_invalid_expression(tmp_path: Path) -> None:
    # The check above can fail: an unbalanced parenthesis is refused.
    result = check_promql(tmp_path, [("broken", "sum by (le (rate(app_turns_total[$__rate_interval]))")])
    assert result.returncode != 0, result.stdout


def test_every_series_and_label_of_the_dashboard_is_in_the_catalogue() -> None:
    problems = []
    for where, expr in expressions():
        names = metric_names(substituted(expr))
        known = {name: documented(name) for name in names}
        problems += [f"{where}: {name} is not in docs/metrics.md" for name, series in known.items() if series is None]
        labels = set().union(TARGET_LABELS, *(series.labels for series in known.values() if series))
        for name, label in matched_labels(expr):
            series = known.get(name)
            if series is not None and label not in series.labels | TARGET_LABELS:
                problems.append(f"{where}: {name} has no label {label}")
        problems += [f"{where}: no series of it has label {label}" for label in grouping_labels(expr) - labels]
    assert not problems, "\n".join(problems)


def test_every_dashboard_variable_is_a_numeric_constant() -> None:
    assert constants(), "no quota constants"
    for name, value in constants().items():
        assert name.endswith("_quota"), name
        assert float(value) > 0, name
    for _, expr in expressions():
        substituted(expr)  # an unknown variable fails here
    used = {match[1] or match[2] for _, expr in expressions() for match in VARIABLE.finditer(expr)}
    assert set(constants()) <= used, "a constant no panel uses"


def test_the_dashboard_names_only_the_provisioned_data_sources() -> None:
    provisioned = {source["uid"]: source for source in load_yaml(DATASOURCES)["datasources"]}
    assert set(provisioned) == DATASOURCE_UIDS
    assert provisioned["prometheus"]["type"] == "prometheus"
    assert provisioned["jaeger"]["type"] == "jaeger"
    destinations = provisioned["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert destinations == [{"name": "trace_id", "datasourceUid": "jaeger"}]
    # Every data source reference anywhere in the dashboard, panels and targets alike.
    references: list[Any] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "datasource" in node:
                references.append(node["datasource"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard())
    assert references
    for reference in references:
        assert isinstance(reference, dict), f"a data source named by name, not uid: {reference!r}"
        assert reference["uid"] in DATASOURCE_UIDS, reference
        assert reference["type"] == provisioned[reference["uid"]]["type"], reference
    for _, target in targets():
        assert target["datasource"]["uid"] == "prometheus"


def test_the_dashboard_is_fixed_described_and_shows_exemplars_on_latency() -> None:
    board = dashboard()
    assert board["uid"] == "voice-companion"
    assert 39 <= board["schemaVersion"] < 42  # Grafana 11
    shown = [panel for panel in panels(board) if panel["type"] != "row"]
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids))
    for panel in shown:
        assert panel["description"].strip(), panel["title"]
        assert "docs/operations.md" in panel["description"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            if "histogram_quantile" in target["expr"]:
                assert target["exemplar"] is True, f"{panel['title']} {target['refId']}: no exemplars"
    # No two panels on one spot of the grid.
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(board):
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_the_dashboard_covers_what_the_catalogue_promises() -> None:
    used = {name for _, expr in expressions() for name in metric_names(substituted(expr))}
    for family in (
        "http_server_request_duration_seconds",
        "app_turns_total",
        "app_turn_stage_duration_seconds",
        "app_breaker_state",
        "edge_rate_limit_decisions_total",
        "edge_rate_limit_store_degraded",
        "edge_errors_total",
        "edge_upstream_connections",
        "app_groq_tokens_total",
        "app_groq_audio_seconds_total",
        "app_elevenlabs_characters_total",
        "container_memory_working_set_bytes",
        "container_memory_limit_bytes",
        "process_cpu_seconds_total",
        "readiness_status",
    ):
        assert any(name == family or name.startswith(family + "_") for name in used), family
    exprs = [expr for _, expr in expressions()]
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(f"histogram_quantile({quantile}," in expr and "http_route" in expr for expr in exprs), quantile
    memory = [panel for panel in panels(dashboard()) if "container_memory_limit_bytes" in str(panel.get("targets"))]
    assert [step["value"] for step in memory[0]["fieldConfig"]["defaults"]["thresholds"]["steps"]] == [None, 0.8]


def test_the_dashboard_provider_loads_the_mounted_directory() -> None:
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file"
    grafana = observability_config()["services"]["grafana"]
    mounts = {volume["target"]: Path(volume["source"]) for volume in grafana["volumes"]}
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    assert mounts["/etc/grafana/provisioning"] == DATASOURCES.parent.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


# -- Prometheus --------------------------------------------------------------------------------------------------


@needs_promtool
def test_promtool_accepts_the_prometheus_config() -> None:
    result = promtool("check", "config", PROMETHEUS_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_refuses_a_broken_prometheus_config(tmp_path: Path) -> None:
    # The check above can fail: two jobs of one name are refused.
    config = load_yaml(PROMETHEUS_CONFIG)
    config["scrape_configs"].append(config["scrape_configs"][0])
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", path)
    assert result.returncode != 0, result.stdout


def scrape_targets() -> dict[str, tuple[str, int]]:
    """Each job's (host name, port)."""
    found = {}
    for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]:
        if "static_configs" in job:
            ((host, port),) = [
                target.rsplit(":", 1) for config in job["static_configs"] for target in config["targets"]
            ]
            found[job["job_name"]] = (host, int(port))
        else:
            ((sd,),) = [job["dns_sd_configs"]]
            ((host,),) = [sd["names"]]
            assert sd["type"] == "A"
            found[job["job_name"]] = (host, sd["port"])
    return found


def test_prometheus_scrapes_each_process_on_its_compose_metrics_port() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["global"]["scrape_interval"] == "15s"
    services = observability_config()["services"]
    assert set(scrape_targets()) == set(METRICS_PORTS)
    for job, (host, port) in scrape_targets().items():
        assert host == job, "the compose service name"
        assert services[job]["environment"][METRICS_PORTS[job]] == str(port)
    # The rules as mounted: relative to the config file, inside the mounted directory.
    prometheus = services["prometheus"]
    mounts = {Path(volume["source"]): volume["target"] for volume in prometheus["volumes"] if volume["type"] == "bind"}
    assert f"--config.file={mounts[PROMETHEUS_CONFIG.parent]}/{PROMETHEUS_CONFIG.name}" in prometheus["command"]
    # Every rules file, and no rule unit test file (promtool test rules reads those).
    rules = sorted(path.name for path in (PROMETHEUS_CONFIG.parent / "rules").glob("*.yml"))
    assert sorted(config["rule_files"]) == [f"rules/{name}" for name in rules if not name.endswith("_test.yml")]
    assert "--enable-feature=exemplar-storage" in prometheus["command"]


# -- the collector ---------------------------------------------------------------------------------------------

# The components this configuration may use, each in the contrib distribution of the pinned
# release (otel/opentelemetry-collector-contrib in docker-compose.yml).
CONTRIB_COMPONENTS = {
    "receivers": {"otlp"},
    "processors": {"memory_limiter", "attributes", "redaction", "transform", "batch"},
    "exporters": {"otlp", "otlphttp", "debug"},
    "extensions": {"health_check"},
}
# Attribute keys that hold what a user said or heard, their ids, URLs with ids, their address.
CONTENT_KEYS = [
    "transcript",
    "reply",
    "text",
    "session.id",
    "session_id",
    "audio.id",
    "url.full",
    "url.path",
    "url.query",
    "http.url",
    "http.target",
    "gen_ai.prompt",
    "gen_ai.completion",
    "gen_ai.prompt.0.content",
    "app.turn.transcript",
    "client.address",
]
# What a trace is for: kept.
KEPT_KEYS = [
    "http.route",
    "http.request.method",
    "http.response.status_code",
    "error.type",
    "server.address",
    "server.port",
    "url.scheme",
    "outbound.provider",
    "http.request.resend_count",
]


def collector() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(COLLECTOR_CONFIG)
    return loaded


def kind(component: str) -> str:
    return component.split("/", 1)[0]


def test_every_pipeline_limits_memory_first_and_redacts() -> None:
    config = collector()
    pipelines = config["service"]["pipelines"]
    assert "traces" in pipelines
    for name, pipeline in pipelines.items():
        processors = pipeline["processors"]
        assert kind(processors[0]) == "memory_limiter", name
        assert kind(processors[-1]) == "batch", name
        if kind(name) in ("traces", "logs"):
            assert {"attributes", "redaction"} <= {kind(processor) for processor in processors}, name
    limiter = config["processors"]["memory_limiter"]
    assert limiter["check_interval"]
    assert 0 < limiter["spike_limit_percentage"] < limiter["limit_percentage"] <= 90


def test_every_component_of_a_pipeline_is_defined_and_in_contrib() -> None:
    config = collector()
    service = config["service"]
    for section, allowed in CONTRIB_COMPONENTS.items():
        for component in config.get(section, {}):
            assert kind(component) in allowed, f"{section}: {component}"
    for extension in service.get("extensions", []):
        assert extension in config["extensions"], extension
    for name, pipeline in service["pipelines"].items():
        for section in ("receivers", "processors", "exporters"):
            assert pipeline[section], f"{name}: no {section}"
            for component in pipeline[section]:
                assert component in config[section], f"{name}: {component} is not defined"
    used = {
        component
        for pipeline in service["pipelines"].values()
        for section in pipeline.values()
        for component in section
    }
    defined = {component for section in ("receivers", "processors", "exporters") for component in config[section]}
    assert defined == used, "a component no pipeline uses"


def test_the_collector_listens_for_otlp_and_sends_only_within_the_stack() -> None:
    config = collector()
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"
    services = set(observability_config()["services"])
    for name, exporter in config["exporters"].items():
        endpoint = exporter.get("endpoint")
        if kind(name) == "debug":
            continue
        assert endpoint, name
        host = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}").hostname
        assert host in services, f"{name} sends to {endpoint}, not a compose service"
    assert config["exporters"]["otlp/jaeger"]["endpoint"] == "jaeger:4317"


def deleted_by_collector(key: str) -> bool:
    """Whether the attributes processors of the traces pipeline delete `key` (a `pattern` is a
    Go regular expression searched in the key, like Python's re.search for these)."""
    config = collector()
    for processor in config["service"]["pipelines"]["traces"]["processors"]:
        if kind(processor) != "attributes":
            continue
        for action in config["processors"][processor]["actions"]:
            if action["action"] != "delete":
                continue
            if action.get("key") == key or ("pattern" in action and re.search(action["pattern"], key)):
                return True
    return False


@pytest.mark.parametrize("key", CONTENT_KEYS)
def test_the_collector_deletes_content_ids_and_urls(key: str) -> None:
    assert deleted_by_collector(key)


@pytest.mark.parametrize("key", KEPT_KEYS)
def test_the_collector_keeps_what_a_trace_is_for(key: str) -> None:
    assert not deleted_by_collector(key)


def test_the_collector_masks_long_opaque_values() -> None:
    (redaction,) = [settings for name, settings in collector()["processors"].items() if kind(name) == "redaction"]
    assert redaction["allow_all_keys"] is True  # keys are the attributes processor's job
    assert redaction["summary"] == "silent"
    assert "[A-Za-z0-9_-]{32,}" in redaction["blocked_values"]
    blocked = [re.compile(pattern) for pattern in redaction["blocked_values"]]
    for secret in (str(uuid.uuid4()), uuid.uuid4().hex, "gsk_" + "a1B2" * 10):
        assert any(pattern.search(secret) for pattern in blocked), secret
    for harmless in ("/api/v1/sessions/*/turns", "POST", "api.groq.com", "reply_unavailable"):
        assert not any(pattern.search(harmless) for pattern in blocked), harmless


# -- compose ---------------------------------------------------------------------------------------------------


@cache
def observability_config() -> dict[str, Any]:
    return compose_config(COMPOSE_FILE, env=clean_environment(COMPOSE_PROFILES=PROFILE))


def test_the_profile_adds_the_observability_services_and_only_with_it() -> None:
    services = observability_config()["services"]
    assert set(services) == {"edge", "app", "sim"} | OBSERVABILITY_SERVICES
    for name in OBSERVABILITY_SERVICES:
        assert services[name]["profiles"] == [PROFILE], name
    assert not OBSERVABILITY_SERVICES & set(compose_config(COMPOSE_FILE, env=clean_environment())["services"])


def test_every_observability_image_is_pinned_and_every_service_bounded() -> None:
    services = observability_config()["services"]
    for name in OBSERVABILITY_SERVICES:
        service = services[name]
        assert PINNED_IMAGE.match(service["image"]), service["image"]
        limits = service["deploy"]["resources"]["limits"]
        assert 0 < int(limits["memory"]) <= 1024**3, name
        assert float(limits["cpus"]) > 0, name
        assert service["logging"] == {"driver": "json-file", "options": {"max-size": "10m", "max-file": "3"}}, name
        assert "internal" in service["networks"], name
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), volume["source"]
                assert volume["read_only"] is True, volume


def test_only_grafana_is_published_on_loopback_and_no_metrics_port_at_all() -> None:
    services = observability_config()["services"]
    published = {name: service["ports"] for name, service in services.items() if service.get("ports")}
    assert set(published) == {"edge", "grafana"}
    assert published["grafana"] == [
        {"mode": "ingress", "host_ip": "127.0.0.1", "target": 3000, "published": "3000", "protocol": "tcp"}
    ]
    for name in OBSERVABILITY_SERVICES - {"grafana"}:
        assert list(services[name]["networks"]) == ["internal"], name
    for name, variable in METRICS_PORTS.items():
        port = int(services[name]["environment"][variable])
        assert port not in {port_mapping["target"] for port_mapping in services[name].get("ports", [])}, name
        assert "expose" not in services[name], name


def test_the_traces_endpoint_is_passed_through_only_when_set() -> None:
    # Unset: no variable in the containers, so no export (an empty value would not start).
    unset = observability_config()["services"]
    for name in ("edge", "app"):
        assert unset[name]["environment"]["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] is None, name
    endpoint = "http://otel-collector:4318/v1/traces"
    env = clean_environment(COMPOSE_PROFILES=PROFILE, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=endpoint)
    services = compose_config(COMPOSE_FILE, env=env)["services"]
    for name in ("edge", "app"):
        assert services[name]["environment"]["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == endpoint, name
    # It names the collector's OTLP/HTTP receiver, and the processes' settings take it.
    url = urlsplit(endpoint)
    assert url.hostname in services
    assert collector()["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(f":{url.port}")
    assert OtelSettings(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=endpoint).traces_export_enabled


def test_every_config_file_parses() -> None:
    for path in (PROMETHEUS_CONFIG, COLLECTOR_CONFIG, DATASOURCES, DASHBOARD_PROVIDERS):
        assert isinstance(load_yaml(path), dict), path
    for path in sorted((OPS / "prometheus" / "rules").glob("*.yml")):
        assert isinstance(load_yaml(path), dict), path
    assert isinstance(dashboard()["panels"], list)
