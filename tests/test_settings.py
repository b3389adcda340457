"""The edge's settings, read from the environment and validated at start-up.

Valid values are checked on `EdgeSettings` itself; invalid ones through `python -m edge`,
which must refuse to start with exit status 2 and a message that names the environment
variable the operator has to fix - without a Python traceback.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.settings import Environment
from edge.settings import EdgeSettings
from tests.servers import closed_port

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Unprefixed variables the edge reads; with the EDGE_ ones, cleared so each test states what it sets.
SETTING_VARIABLES = ("PORT", "ENVIRONMENT")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("EDGE_") or name in SETTING_VARIABLES:
            monkeypatch.delenv(name)


# -- values read from the environment ------------------------------------------------------------------


def test_defaults() -> None:
    settings = EdgeSettings()
    assert settings.upstream_url == "http://127.0.0.1:8000"
    assert settings.host == "0.0.0.0"
    assert settings.port == 8080
    assert settings.environment is Environment.development
    assert settings.trusted_proxies == []


def test_settings_come_from_edge_prefixed_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_UPSTREAM_URL", "http://app.internal:9000/")
    monkeypatch.setenv("EDGE_HOST", "127.0.0.1")
    monkeypatch.setenv("EDGE_WORKERS", "4")
    monkeypatch.setenv("EDGE_RATE_LIMIT_STORAGE_URL", "redis://redis.internal:6379")  # shared by the workers
    monkeypatch.setenv("EDGE_DRAIN_TIMEOUT", "2.5")
    monkeypatch.setenv("ENVIRONMENT", "production")
    settings = EdgeSettings()
    assert settings.upstream_url == "http://app.internal:9000"  # the trailing slash is dropped
    assert settings.host == "127.0.0.1"
    assert settings.workers == 4
    assert settings.drain_timeout == 2.5
    assert settings.environment is Environment.production


def test_platform_port_is_used_without_edge_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9123")
    assert EdgeSettings().port == 9123


def test_edge_port_wins_over_platform_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9123")
    monkeypatch.setenv("EDGE_PORT", "9456")
    assert EdgeSettings().port == 9456


def test_trusted_proxies_are_a_comma_separated_list_of_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_TRUSTED_PROXIES", "10.0.0.0/8,fd00::/8")
    assert EdgeSettings().trusted_proxies == [
        ipaddress.IPv4Network("10.0.0.0/8"),
        ipaddress.IPv6Network("fd00::/8"),
    ]


def test_trusted_proxies_tolerate_spaces_and_single_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_TRUSTED_PROXIES", " 10.0.0.0/8 ,  fd00::/8, 192.168.1.7 ")
    assert EdgeSettings().trusted_proxies == [
        ipaddress.IPv4Network("10.0.0.0/8"),
        ipaddress.IPv6Network("fd00::/8"),
        ipaddress.IPv4Network("192.168.1.7/32"),
    ]


def test_empty_trusted_proxies_trust_nobody(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_TRUSTED_PROXIES", "")
    assert EdgeSettings().trusted_proxies == []


# -- invalid values refused at start-up -----------------------------------------------------------------

# Names in a message that look like environment variables.
VARIABLE_NAME = re.compile(r"\b(?:EDGE_\w+|PORT|ENVIRONMENT)\b")


def start_edge_with(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("EDGE_") and name not in SETTING_VARIABLES
    }
    # Should the configuration wrongly be accepted, the edge must not take a public port.
    full_env["EDGE_HOST"] = "127.0.0.1"
    full_env.update(env)
    try:
        return subprocess.run(
            [sys.executable, "-m", "edge"],
            cwd=PROJECT_ROOT,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the edge started with an invalid configuration: {env}")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("EDGE_PORT", "notaport"),
        ("EDGE_PORT", "70000"),
        ("EDGE_UPSTREAM_URL", "ftp://x"),
        ("EDGE_UPSTREAM_URL", "http://user:secret@app.internal:9000"),
        ("EDGE_TRUSTED_PROXIES", "0.0.0.0/0"),
        ("EDGE_TRUSTED_PROXIES", "10.0.0.0/8, ::/0"),
        ("EDGE_TRUSTED_PROXIES", "not-a-cidr"),
        ("EDGE_TRUSTED_PROXIES", "10.0.0.0/8,not-a-cidr"),
        ("ENVIRONMENT", "prod"),
        ("EDGE_WORKERS", "0"),
        ("EDGE_LOG_LEVEL", "loud"),
        # The edge drops these before limiting: every client would share one bucket.
        ("EDGE_RATE_LIMIT_KEY", "header:X-Real-IP"),
        ("EDGE_RATE_LIMIT_KEY", "client,header:x_api_key"),
        ("EDGE_RATE_LIMIT_KEY", "header:x-forwarded-for"),
        ("EDGE_CLIENT_HEADER_TIMEOUT", "0"),
        ("EDGE_CLIENT_BODY_MIN_RATE", "-1"),
        ("EDGE_MAX_CONNECTIONS_PER_CLIENT", "0"),
        ("EDGE_MAX_EXCHANGES_PER_CLIENT", "0"),
        ("EDGE_REQUEST_BUFFER_BYTES", "-1"),
    ],
)
def test_invalid_value_is_refused_naming_the_variable(variable: str, value: str) -> None:
    # A valid, free EDGE_PORT unless that is the variable under test.
    result = start_edge_with({"EDGE_PORT": str(closed_port()), variable: value})

    assert result.returncode == 2, f"exit status {result.returncode}; stderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == "", "a refused configuration must not reach the logs"
    named = set(VARIABLE_NAME.findall(result.stderr))
    assert named == {variable}, (
        f"the message should name {variable} and no other variable; it names {sorted(named)}:\n{result.stderr}"
    )
    assert f"{variable}:" in result.stderr


def test_invalid_platform_port_is_refused_naming_port() -> None:
    result = start_edge_with({"PORT": "notaport"})
    assert result.returncode == 2, f"exit status {result.returncode}; stderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    named = set(VARIABLE_NAME.findall(result.stderr))
    # The operator set PORT (EDGE_PORT is unset): the message must lead them to PORT.
    assert "PORT" in named, f"the message does not name PORT:\n{result.stderr}"
    assert named <= {"PORT", "EDGE_PORT"}, f"the message names {sorted(named)}:\n{result.stderr}"
