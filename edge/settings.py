"""The edge's configuration: read once from the environment, validated at start-up.

Every setting is documented in docs/configuration.md (a test keeps the two in sync).
"""

from __future__ import annotations

import ipaddress
import os
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Environment(StrEnum):
    development = "development"
    staging = "staging"
    production = "production"


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def split_comma_list(value: Any) -> Any:
    """Every list setting is comma-separated in the environment: `a,b,c`."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class EdgeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGE_", frozen=True, extra="ignore", populate_by_name=True)

    environment: Environment = Field(Environment.development, validation_alias=AliasChoices("ENVIRONMENT"))
    upstream_url: str = "http://127.0.0.1:8000"
    host: str = "0.0.0.0"  # noqa: S104 - the edge is the public entry point
    port: int = Field(8080, ge=1, le=65535, validation_alias=AliasChoices("EDGE_PORT", "PORT"))
    workers: int = Field(1, ge=1, le=64)
    upstream_connect_timeout: float = Field(5.0, gt=0)
    upstream_read_timeout: float = Field(90.0, gt=0)
    upstream_idle_timeout: float = Field(4.0, gt=0)
    upstream_pool_size: int = Field(100, ge=1)
    trusted_proxies: Annotated[list[IPNetwork], NoDecode] = []
    client_keep_alive_timeout: float = Field(75.0, gt=0)
    drain_timeout: float = Field(20.0, ge=0)
    log_level: LogLevel = LogLevel.info
    ws_max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)

    @field_validator("upstream_url")
    @classmethod
    def _upstream_is_http_origin(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("must not carry credentials, a query or a fragment")
        try:
            parts.port  # noqa: B018 - raises on an out-of-range port
        except ValueError as exc:
            raise ValueError("has an invalid port") from exc
        return value.rstrip("/")

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _parse_trusted_proxies(cls, value: Any) -> Any:
        networks = []
        for item in split_comma_list(value):
            if not isinstance(item, str):
                networks.append(item)
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP network such as 10.0.0.0/8 or fd00::/8") from None
        return networks

    @field_validator("trusted_proxies")
    @classmethod
    def _no_catch_all_proxy(cls, value: list[IPNetwork]) -> list[IPNetwork]:
        # Trusting every address would let any client pick its own address.
        if any(network.prefixlen == 0 for network in value):
            raise ValueError("must not contain a catch-all network such as 0.0.0.0/0 or ::/0")
        return value


class ConfigurationError(Exception):
    """Raised at start-up with a message an operator can act on."""


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
        variable = environment_variable(settings_class, str(problem["loc"][0]))
        value = problem.get("input")
        shown = f" (got {value!r})" if isinstance(value, str | int | float) else ""
        message = problem["msg"].removeprefix("Value error, ")
        lines.setdefault(variable, f"  {variable}: {message}{shown}")
    return "invalid configuration:\n" + "\n".join(lines.values())


def load_settings() -> EdgeSettings:
    try:
        return EdgeSettings()
    except ValidationError as error:
        raise ConfigurationError(describe_validation_error(EdgeSettings, error)) from None
