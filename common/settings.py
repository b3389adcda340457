"""Settings conventions every process of the project follows.

Each process reads its environment once into one typed settings class, validated at
start-up; an invalid value stops the start-up with a message naming the variable. List
values are comma-separated. The edge and the app read `ENVIRONMENT`; the simulator does not.
With `ENVIRONMENT=production` each refuses the combinations it knows to be unsafe, all of
them in one message (docs/configuration.md#what-production-refuses).
"""

from __future__ import annotations

import os
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings

SettingsT = TypeVar("SettingsT", bound=BaseSettings)


class Environment(StrEnum):
    development = "development"
    staging = "staging"
    production = "production"


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class Sampler(StrEnum):
    """The OpenTelemetry sampler names of OTEL_TRACES_SAMPLER."""

    always_on = "always_on"
    always_off = "always_off"
    traceidratio = "traceidratio"
    parentbased_always_on = "parentbased_always_on"
    parentbased_always_off = "parentbased_always_off"
    parentbased_traceidratio = "parentbased_traceidratio"


def split_comma_list(value: Any) -> Any:
    """Every list setting is comma-separated in the environment: `a,b,c`."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class OtelSettings(BaseSettings):
    """The standard OpenTelemetry variables a process honours; spans are exported only when
    an endpoint is set (metrics are scraped: docs/metrics.md)."""

    otel_service_name: str = Field("edge", validation_alias=AliasChoices("OTEL_SERVICE_NAME"))
    otel_exporter_otlp_endpoint: str | None = Field(None, validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT"))
    otel_exporter_otlp_traces_endpoint: str | None = Field(
        None, validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    otel_traces_sampler: Sampler = Field(
        Sampler.parentbased_traceidratio, validation_alias=AliasChoices("OTEL_TRACES_SAMPLER")
    )
    otel_traces_sampler_arg: float = Field(1.0, ge=0, le=1, validation_alias=AliasChoices("OTEL_TRACES_SAMPLER_ARG"))

    @field_validator(
        "otel_exporter_otlp_endpoint",
        "otel_exporter_otlp_traces_endpoint",
    )
    @classmethod
    def _otlp_endpoint(cls, value: str | None) -> str | None:
        if value and urlsplit(value).scheme not in ("http", "https"):  # empty: unset
            raise ValueError("must be an http:// or https:// URL (OTLP over HTTP)")
        return value or None

    @property
    def traces_export_enabled(self) -> bool:
        return bool(self.otel_exporter_otlp_endpoint or self.otel_exporter_otlp_traces_endpoint)


class ConfigurationError(Exception):
    """Raised at start-up with a message an operator can act on."""


def refuse_in_production(environment: Environment, unsafe: list[str]) -> None:
    """Stops a production start-up on any of `unsafe`, each naming its variables and why."""
    if environment is Environment.production and unsafe:
        raise ValueError("ENVIRONMENT=production refuses:\n    " + "\n    ".join(unsafe))


def environment_variable(settings_class: type[BaseSettings], location: str) -> str:
    """The variable an operator set for a field, as named in docs/configuration.md."""
    prefix = settings_class.model_config.get("env_prefix", "")
    for name, field in settings_class.model_fields.items():
        choices = field.validation_alias.choices if isinstance(field.validation_alias, AliasChoices) else []
        if location == name or location in choices:
            if not choices:
                return f"{prefix}{name}".upper()
            names = [str(choice) for choice in choices]
            return next((choice for choice in names if choice in os.environ), names[0])
    return location.upper()


def describe_validation_error(settings_class: type[BaseSettings], error: ValidationError) -> str:
    lines: dict[str, str] = {}
    for problem in error.errors():
        message = problem["msg"].removeprefix("Value error, ")
        if not problem["loc"]:  # a rule across settings: its message names them
            lines.setdefault(message, f"  {message}")
            continue
        variable = environment_variable(settings_class, str(problem["loc"][0]))
        value = problem.get("input")
        shown = f" (got {value!r})" if isinstance(value, str | int | float) else ""
        lines.setdefault(variable, f"  {variable}: {message}{shown}")
    return "invalid configuration:\n" + "\n".join(lines.values())


def load(settings_class: type[SettingsT]) -> SettingsT:
    try:
        return settings_class()
    except ValidationError as error:
        raise ConfigurationError(describe_validation_error(settings_class, error)) from None
