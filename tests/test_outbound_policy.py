"""Per-host policies: provider defaults, environment overrides, and start-up validation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.outbound import HostPolicy, OutboundSettings
from common.settings import ConfigurationError, load

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def test_provider_defaults_suit_the_providers() -> None:
    settings = OutboundSettings()
    assert (settings.groq.attempt_timeout, settings.groq.total_deadline) == (8.0, 20.0)
    assert (settings.elevenlabs.max_concurrency, settings.elevenlabs.attempt_timeout) == (3, 6.0)
    assert (settings.qdrant.attempt_timeout, settings.qdrant.total_deadline) == (2.0, 5.0)
    assert settings.qdrant.all_methods_idempotent
    assert not settings.groq.all_methods_idempotent
    assert not settings.elevenlabs.all_methods_idempotent
    assert settings.default == HostPolicy()
    assert {settings.policy_named(name).half_open_probes for name in ("groq", "elevenlabs", "qdrant")} == {1}


def test_names_without_a_policy_of_their_own_get_the_default() -> None:
    settings = OutboundSettings()
    assert settings.policy_named("groq") is settings.groq
    assert settings.policy_named("openweather") is settings.default
    assert settings.policy_named("default") is settings.default


def test_one_variable_changes_one_field_and_keeps_the_providers_other_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("APP_OUTBOUND_GROQ__MAX_RETRIES", "1")
    monkeypatch.setenv("APP_OUTBOUND_ELEVENLABS__MAX_CONCURRENCY", "10")  # a Pro plan
    monkeypatch.setenv("APP_OUTBOUND_DEFAULT__OPEN_SECONDS", "5")
    settings = OutboundSettings()
    assert settings.groq == OutboundSettings.model_fields["groq"].default.model_copy(update={"max_retries": 1})
    assert settings.elevenlabs.max_concurrency == 10
    assert settings.elevenlabs.bulkhead_wait == 10.0
    assert settings.default.open_seconds == 5.0
    assert settings.groq.open_seconds == 30.0  # the default policy's change is not the provider's


def test_an_attempt_timeout_longer_than_the_deadline_is_refused_naming_the_policy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("APP_OUTBOUND_ELEVENLABS__ATTEMPT_TIMEOUT", "50")
    with pytest.raises(ValidationError) as refused:
        OutboundSettings()
    [error] = refused.value.errors()
    assert error["loc"] == ("elevenlabs",)
    assert error["msg"] == (
        "Value error, attempt_timeout (50 s) is longer than total_deadline (16 s): "
        "no attempt could ever use its full timeout"
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"connect_timeout": 5.0, "attempt_timeout": 4.0},
            "connect_timeout (5 s) is longer than attempt_timeout (4 s)",
        ),
        (
            {"minimum_calls": 30, "window_size": 20},
            "minimum_calls (30) is larger than window_size (20): the breaker could never trip",
        ),
        ({"window_seconds": 15.0}, "window_seconds (15 s) is shorter than twice attempt_timeout (8 s)"),
        ({"backoff_base": 5.0}, "backoff_base (5 s) is larger than backoff_max (4 s)"),
    ],
)
def test_inconsistent_policies_are_refused_naming_the_policy(fields: dict[str, float], message: str) -> None:
    # Partial values: the rest are Groq's defaults (attempt 8 s, backoff up to 4 s).
    with pytest.raises(ValidationError) as refused:
        OutboundSettings(groq=fields)
    [error] = refused.value.errors()
    assert (error["loc"], error["msg"]) == (("groq",), f"Value error, {message}")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("failure_rate_threshold", 0.0),
        ("failure_rate_threshold", 1.5),
        ("half_open_probes", 0),
        ("max_concurrency", 0),
        ("retry_budget_ratio", -0.1),
        ("attempt_timeout", 0.0),
        ("unknown_field", 1),
    ],
)
def test_out_of_range_fields_are_refused(field: str, value: float) -> None:
    with pytest.raises(ValidationError) as refused:
        OutboundSettings(qdrant={field: value})
    assert [error["loc"] for error in refused.value.errors()] == [("qdrant", field)]


@pytest.mark.parametrize("variable", ["APP_OUTBOUND_GROQQ__MAX_RETRIES", "APP_OUTBOUND_ELEVEN_LABS__MAX_CONCURRENCY"])
def test_a_variable_naming_no_policy_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    monkeypatch.setenv(variable, "1")
    with pytest.raises(ConfigurationError) as refused:
        load(OutboundSettings)
    assert str(refused.value) == (
        "invalid configuration:\n"
        f"  {variable}: no such outbound policy (the policies are DEFAULT, GROQ, ELEVENLABS, QDRANT)"
    )


def test_the_app_does_not_start_with_a_misspelt_provider(tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith(("APP_", "ENVIRONMENT"))}
    env |= {"APP_DATA_DIR": str(tmp_path), "APP_PORT": "1", "APP_OUTBOUND_ELEVENLAB__MAX_CONCURRENCY": "10"}
    result = subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "APP_OUTBOUND_ELEVENLAB__MAX_CONCURRENCY: no such outbound policy" in result.stderr, result.stderr
