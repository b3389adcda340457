"""The shipped environments and what production refuses (docs/configuration.md#environments).

`.env.example` names every variable the processes read, each once, at its default;
`config/*.env` name only variables a process reads, and load - as the environment of each
process's own `load_configuration()`, in a subprocess - into valid settings. No file holds
a secret. With `ENVIRONMENT=production`, `python -m edge` and `python -m app` refuse each
unsafe combination with exit status 2 and a message naming its variables, without a
traceback; the same values pass outside production.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from pydantic import AliasChoices, BaseModel
from pydantic_settings import BaseSettings

from app.outbound import OutboundSettings
from app.settings import AppSettings
from edge.settings import EdgeSettings
from sim.settings import SimSettings
from tests.processes import PROJECT_ROOT
from tests.servers import closed_port

CONFIG = PROJECT_ROOT / "config"
EXAMPLE = PROJECT_ROOT / ".env.example"
ENVIRONMENT_FILES = sorted(CONFIG.glob("*.env"))
SETTINGS_CLASSES: list[type[BaseSettings]] = [EdgeSettings, AppSettings, OutboundSettings, SimSettings]

# `NAME=value`, or commented out: `# NAME=value`.
LINE = re.compile(r"^(?P<commented>#\s*)?(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")
# What needs no quoting in a shell, in Compose's env_file or in a platform's raw editor.
PLAIN_VALUE = re.compile(r"^[A-Za-z0-9_./:,@*+=-]*$")
SECRET_NAME = re.compile(r"(API_KEY|PASSWORD|SECRET|TOKEN)$")
# Variables whose values carry a password when set (`redis://:pw@...`, `postgresql://u:pw@...`).
CREDENTIAL_URLS = {"APP_DATABASE_URL", "EDGE_RATE_LIMIT_STORAGE_URL"}
SIMULATED_KEY = "simulated"

# Keys "from the platform's secrets", for the files that leave them out.
PLATFORM_KEYS = {"GROQ_API_KEY": "gsk-test-groq-key", "ELEVENLABS_API_KEY": "test-elevenlabs-key"}

# Names in a message that look like environment variables.
VARIABLE_NAME = re.compile(r"\b(?:EDGE_\w+|APP_\w+|GROQ_\w+|ELEVENLABS_\w+|PORT|ENVIRONMENT)\b")


# -- reading env files -----------------------------------------------------------------------


def entries(path: Path) -> list[tuple[str, str, bool]]:
    """(name, value, commented out) of every variable line; other comments are skipped."""
    found = []
    for line in path.read_text().splitlines():
        match = LINE.match(line.strip())
        if match:
            found.append((match["name"], match["value"], match["commented"] is not None))
    return found


def active(path: Path) -> dict[str, str]:
    return {name: value for name, value, commented in entries(path) if not commented}


def variables(settings_class: type[BaseSettings]) -> set[str]:
    """Every variable a settings class reads; a nested model's fields one by one."""
    prefix = str(settings_class.model_config.get("env_prefix", ""))
    delimiter = settings_class.model_config.get("env_nested_delimiter")
    names: set[str] = set()
    for field_name, field in settings_class.model_fields.items():
        model = field.annotation
        if isinstance(field.validation_alias, AliasChoices):
            names.update(str(choice) for choice in field.validation_alias.choices)
        elif delimiter and isinstance(model, type) and issubclass(model, BaseModel):
            names.update(f"{prefix}{field_name}{delimiter}{nested}".upper() for nested in model.model_fields)
        else:
            names.add(f"{prefix}{field_name}".upper())
    return names


ALL_VARIABLES = set().union(*(variables(settings_class) for settings_class in SETTINGS_CLASSES))


def clean_environment(**values: str) -> dict[str, str]:
    """This process's environment without any project variable, plus `values`."""
    kept = {name: value for name, value in os.environ.items() if name not in ALL_VARIABLES}
    return {**kept, **values}


CONFIGURATION_SCRIPT = """
import json, sys
from common.settings import ConfigurationError
from app.__main__ import load_configuration as app
from edge.__main__ import load_configuration as edge
from sim.__main__ import load_configuration as sim

loaded = {}
for name, load in (("edge", edge), ("app", app), ("sim", sim)):
    try:
        settings = load()[0] if name != "sim" else load()
    except ConfigurationError as error:
        loaded[name] = {"error": str(error)}
    else:
        loaded[name] = json.loads(settings.model_dump_json())
print(json.dumps(loaded))
"""


def configurations(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """What each process's `load_configuration()` makes of `env`, as its own process would."""
    result = subprocess.run(
        [sys.executable, "-c", CONFIGURATION_SCRIPT],
        cwd=PROJECT_ROOT,
        env=clean_environment(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded: dict[str, dict[str, Any]] = json.loads(result.stdout)
    return loaded


# -- .env.example ----------------------------------------------------------------------------


def test_the_example_names_every_variable_once_and_nothing_else() -> None:
    names = [name for name, _, _ in entries(EXAMPLE)]
    repeated = sorted({name for name in names if names.count(name) > 1})
    assert not repeated, f"named more than once in .env.example: {repeated}"
    missing = ALL_VARIABLES - set(names)
    assert not missing, f"read by a process but not in .env.example: {sorted(missing)}"
    unknown = set(names) - ALL_VARIABLES
    assert not unknown, f"in .env.example but read by no process: {sorted(unknown)}"


def test_the_example_shows_every_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every line with a value, commented out or not, and every active empty one, loaded as
    the environment, gives exactly the settings of an empty environment."""
    for name in ALL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    defaults = {settings_class: settings_class() for settings_class in SETTINGS_CLASSES}
    for name, value, commented in entries(EXAMPLE):
        if value or not commented:
            monkeypatch.setenv(name, value)
    for settings_class, default in defaults.items():
        assert settings_class() == default, f"{settings_class.__name__}: .env.example is not its defaults"


# -- config/*.env ------------------------------------------------------------------------------


def test_there_is_a_file_per_environment() -> None:
    assert [path.name for path in ENVIRONMENT_FILES] == ["development.env", "production.env", "staging.env"]
    for path in ENVIRONMENT_FILES:
        assert active(path)["ENVIRONMENT"] == path.stem


@pytest.mark.parametrize("path", ENVIRONMENT_FILES, ids=lambda path: path.name)
def test_an_environment_file_names_only_variables_a_process_reads(path: Path) -> None:
    names = [name for name, _, _ in entries(path)]
    assert len(names) == len(set(names)), f"{path.name} names a variable twice"
    unknown = set(names) - ALL_VARIABLES
    assert not unknown, f"{path.name} names variables no process reads: {sorted(unknown)}"


@pytest.mark.parametrize("path", [*ENVIRONMENT_FILES, EXAMPLE], ids=lambda path: path.name)
def test_no_file_holds_a_secret(path: Path) -> None:
    for name, value, commented in entries(path):
        if SECRET_NAME.search(name) and not commented:
            # The development simulator's placeholder, which is no key (production refuses it).
            allowed = {"", SIMULATED_KEY} if path.name == "development.env" else {""}
            assert value in allowed, f"{path.name}: {name} holds a value; it belongs in the platform's secrets"
        if name in CREDENTIAL_URLS and value:
            assert urlsplit(value).password is None, f"{path.name}: {name} holds a password"
        assert PLAIN_VALUE.match(value), f"{path.name}: {name}={value!r} needs quoting"


def test_the_development_file_configures_every_process() -> None:
    loaded = configurations(active(CONFIG / "development.env"))
    assert all("error" not in settings for settings in loaded.values()), loaded
    edge, app, sim = loaded["edge"], loaded["app"], loaded["sim"]
    assert (edge["host"], edge["port"], edge["upstream_url"]) == ("127.0.0.1", 8080, "http://127.0.0.1:8000")
    assert (app["host"], app["port"]) == ("127.0.0.1", 8000)
    assert app["groq_base_url"] == f"http://127.0.0.1:{sim['port']}/openai/v1"
    assert app["elevenlabs_base_url"] == f"http://127.0.0.1:{sim['port']}"
    assert [app[f"feature_{name}"] for name in ("memory", "speech", "summaries", "api_docs")] == [True] * 4


@pytest.mark.parametrize("environment", ["staging", "production"])
def test_a_deployed_environment_passes_with_the_keys_from_the_platform(environment: str) -> None:
    env = {**active(CONFIG / f"{environment}.env"), **PLATFORM_KEYS, "PORT": "8080"}
    loaded = configurations(env)
    edge, app = loaded["edge"], loaded["app"]
    assert "error" not in edge, edge
    assert "error" not in app, app
    assert edge["environment"] == app["environment"] == environment
    assert edge["port"] == 8080  # the platform's PORT
    assert edge["policy_file"] == "config/edge-policy.toml"
    assert app["groq_base_url"].startswith("https://")
    assert app["elevenlabs_base_url"].startswith("https://")
    assert [app[f"feature_{name}"] for name in ("memory", "speech", "summaries", "api_docs")] == [
        True,
        True,
        True,
        False,
    ]


def test_production_without_the_platform_keys_is_refused_naming_both() -> None:
    app = configurations(active(CONFIG / "production.env"))["app"]
    assert "GROQ_API_KEY unset" in app["error"], app
    assert "ELEVENLABS_API_KEY unset" in app["error"], app


# -- what production refuses, through `python -m edge` and `python -m app` ---------------------


def run_module(module: str, env: dict[str, str], unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    full_env = clean_environment(**env)
    for name in unset:
        full_env.pop(name, None)
    try:
        return subprocess.run(
            [sys.executable, "-m", module],
            cwd=PROJECT_ROOT,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{module} started with {env}, unset {unset}")


def assert_refused(result: subprocess.CompletedProcess[str], named: set[str]) -> None:
    assert result.returncode == 2, f"exit status {result.returncode}; stderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == "", "a refused configuration must not reach the logs"
    found = set(VARIABLE_NAME.findall(result.stderr))
    assert found == named, f"the message should name {sorted(named)}; it names {sorted(found)}:\n{result.stderr}"


def edge_environment(tmp_path: Path, **values: str) -> dict[str, str]:
    # Loopback and a closed port: a configuration wrongly accepted takes no public port.
    return {"EDGE_HOST": "127.0.0.1", "EDGE_PORT": str(closed_port()), **values}


def app_environment(tmp_path: Path, **values: str) -> dict[str, str]:
    """A production app that would start, but for what `values` change."""
    return {
        "ENVIRONMENT": "production",
        "APP_HOST": "127.0.0.1",
        "APP_PORT": str(closed_port()),
        "APP_DATA_DIR": str(tmp_path / "data"),
        **PLATFORM_KEYS,
        **values,
    }


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"EDGE_CORS_ALLOW_ORIGINS": "*"}, {"EDGE_CORS_ALLOW_ORIGINS"}),
        ({"EDGE_LOG_LEVEL": "debug"}, {"EDGE_LOG_LEVEL"}),
        ({"EDGE_WORKERS": "2"}, {"EDGE_WORKERS", "EDGE_RATE_LIMIT_STORAGE_URL"}),
    ],
    ids=["cors-star", "debug-log", "workers-with-memory-counters"],
)
def test_production_edge_refuses(tmp_path: Path, values: dict[str, str], named: set[str]) -> None:
    result = run_module("edge", edge_environment(tmp_path, ENVIRONMENT="production", **values))
    assert_refused(result, {"ENVIRONMENT", *named})
    assert "ENVIRONMENT=production refuses:" in result.stderr


def test_production_edge_lists_every_refusal_at_once(tmp_path: Path) -> None:
    values = {"EDGE_CORS_ALLOW_ORIGINS": "*", "EDGE_LOG_LEVEL": "debug", "EDGE_WORKERS": "2"}
    result = run_module("edge", edge_environment(tmp_path, ENVIRONMENT="production", **values))
    assert_refused(result, {"ENVIRONMENT", *values, "EDGE_RATE_LIMIT_STORAGE_URL"})


def test_edge_trusting_every_address_is_refused_in_every_environment(tmp_path: Path) -> None:
    for environment in ("development", "production"):
        env = edge_environment(tmp_path, ENVIRONMENT=environment, EDGE_TRUSTED_PROXIES="0.0.0.0/0")
        assert_refused(run_module("edge", env), {"EDGE_TRUSTED_PROXIES"})


@pytest.mark.parametrize(
    ("values", "unset", "named"),
    [
        ({}, ("GROQ_API_KEY",), {"GROQ_API_KEY"}),
        ({"GROQ_API_KEY": " "}, (), {"GROQ_API_KEY"}),
        ({"GROQ_API_KEY": "simulated"}, (), {"GROQ_API_KEY"}),
        ({}, ("ELEVENLABS_API_KEY",), {"ELEVENLABS_API_KEY", "APP_FEATURE_SPEECH"}),
        ({"ELEVENLABS_API_KEY": "simulated"}, (), {"ELEVENLABS_API_KEY"}),
        ({"GROQ_BASE_URL": "http://sim:9100/openai/v1"}, (), {"GROQ_BASE_URL"}),
        ({"ELEVENLABS_BASE_URL": "http://sim:9100"}, (), {"ELEVENLABS_BASE_URL"}),
        ({"APP_LOG_LEVEL": "debug"}, (), {"APP_LOG_LEVEL"}),
        # The refusal names the flag by both its names, whichever was set.
        ({"APP_FEATURE_API_DOCS": "true"}, (), {"APP_FEATURE_API_DOCS", "APP_DOCS_ENABLED"}),
        ({"APP_DOCS_ENABLED": "true"}, (), {"APP_FEATURE_API_DOCS", "APP_DOCS_ENABLED"}),
    ],
    ids=[
        "groq-key-unset",
        "groq-key-blank",
        "groq-key-simulated",
        "elevenlabs-key-unset",
        "elevenlabs-key-simulated",
        "groq-over-http",
        "elevenlabs-over-http",
        "debug-log",
        "api-docs",
        "api-docs-by-its-other-name",
    ],
)
def test_production_app_refuses(
    tmp_path: Path, values: dict[str, str], unset: tuple[str, ...], named: set[str]
) -> None:
    result = run_module("app", app_environment(tmp_path, **values), unset)
    assert_refused(result, {"ENVIRONMENT", *named})
    assert "ENVIRONMENT=production refuses:" in result.stderr
    for key in PLATFORM_KEYS.values():
        assert key not in result.stderr, "a key in the message"


def test_production_app_lists_every_refusal_at_once(tmp_path: Path) -> None:
    values = {"APP_LOG_LEVEL": "debug", "APP_FEATURE_API_DOCS": "true", "ELEVENLABS_API_KEY": "simulated"}
    result = run_module("app", app_environment(tmp_path, **values), ("GROQ_API_KEY",))
    assert_refused(result, {"ENVIRONMENT", "GROQ_API_KEY", "APP_DOCS_ENABLED", *values})


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"APP_REPLICAS": "2"}, {"APP_REPLICAS", "APP_DATABASE_URL", "APP_FEATURE_MEMORY", "APP_QDRANT_URL"}),
        (
            {"APP_REPLICAS": "2", "APP_DATABASE_URL": "postgresql://db.internal/app"},
            {"APP_REPLICAS", "APP_FEATURE_MEMORY", "APP_QDRANT_URL"},
        ),
        ({"APP_REPLICAS": "2", "APP_FEATURE_MEMORY": "false"}, {"APP_REPLICAS", "APP_DATABASE_URL"}),
    ],
    ids=["sqlite-and-embedded-memory", "embedded-memory", "sqlite"],
)
@pytest.mark.parametrize("environment", ["development", "production"])
def test_several_replicas_on_one_process_stores_are_refused(
    tmp_path: Path, environment: str, values: dict[str, str], named: set[str]
) -> None:
    result = run_module("app", app_environment(tmp_path, ENVIRONMENT=environment, **values))
    assert_refused(result, named)


def test_what_production_refuses_passes_outside_it(tmp_path: Path) -> None:
    unsafe = {
        "EDGE_CORS_ALLOW_ORIGINS": "*",
        "EDGE_LOG_LEVEL": "debug",
        "EDGE_WORKERS": "2",
        "GROQ_API_KEY": "simulated",
        "GROQ_BASE_URL": "http://127.0.0.1:9100/openai/v1",
        "ELEVENLABS_BASE_URL": "http://127.0.0.1:9100",
        "APP_LOG_LEVEL": "debug",
        "APP_FEATURE_API_DOCS": "true",
    }
    loaded = configurations({**app_environment(tmp_path, **unsafe), "ENVIRONMENT": "staging"})
    assert "error" not in loaded["edge"], loaded["edge"]
    assert "error" not in loaded["app"], loaded["app"]


def test_production_needs_no_elevenlabs_key_without_speech(tmp_path: Path) -> None:
    env = app_environment(tmp_path, APP_FEATURE_SPEECH="false")
    del env["ELEVENLABS_API_KEY"]
    app = configurations(env)["app"]
    assert "error" not in app, app
    assert app["feature_speech"] is False


def test_several_replicas_sharing_their_stores_pass(tmp_path: Path) -> None:
    shared = {
        "APP_REPLICAS": "3",
        "APP_DATABASE_URL": "postgresql://db.internal/app",
        "APP_QDRANT_URL": "http://qdrant.internal:6333",
    }
    app = configurations(app_environment(tmp_path, **shared))["app"]
    assert "error" not in app, app
    assert app["replicas"] == 3
