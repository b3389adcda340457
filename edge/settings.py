"""The edge's configuration: read once from the environment, validated at start-up.

Every setting is documented in docs/configuration.md (a test keeps the two in sync).
"""

from __future__ import annotations

import ipaddress
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from limits import parse_many
from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Environment(StrEnum):
    development = "development"
    staging = "staging"
    production = "production"


class RateLimitStrategy(StrEnum):
    moving_window = "moving-window"
    sliding_window_counter = "sliding-window-counter"
    fixed_window = "fixed-window"


class StoreErrorPolicy(StrEnum):
    open = "open"
    closed = "closed"


class Sampler(StrEnum):
    """The OpenTelemetry sampler names of OTEL_TRACES_SAMPLER."""

    always_on = "always_on"
    always_off = "always_off"
    traceidratio = "traceidratio"
    parentbased_always_on = "parentbased_always_on"
    parentbased_always_off = "parentbased_always_off"
    parentbased_traceidratio = "parentbased_traceidratio"


STORAGE_SCHEMES = ("memory", "redis", "rediss", "redis+cluster", "redis+sentinel")


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
    access_log: bool = True
    ws_max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    policy_file: Path | None = None

    cors_allow_origins: Annotated[list[str], NoDecode] = []
    cors_allow_credentials: bool = False
    cors_allow_methods: Annotated[list[str], NoDecode] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
    cors_allow_headers: Annotated[list[str], NoDecode] = [
        "Accept",
        "Content-Type",
        "Authorization",
        "X-Request-ID",
    ]
    cors_expose_headers: Annotated[list[str], NoDecode] = []
    cors_max_age: int = Field(600, ge=0, le=86400)

    rate_limit_default: str = "120/minute"
    rate_limit_storage_url: str = "memory://"
    rate_limit_strategy: RateLimitStrategy = RateLimitStrategy.moving_window
    rate_limit_key: Annotated[list[str], NoDecode] = ["client"]
    rate_limit_on_store_error: StoreErrorPolicy = StoreErrorPolicy.open
    rate_limit_store_timeout: float = Field(0.5, gt=0, le=5)
    rate_limit_dry_run: bool = False
    rate_limit_legacy_headers: bool = False
    rate_limit_key_prefix: str = Field("edge", pattern=r"^[A-Za-z0-9:_-]{1,64}$")

    content_security_policy: str | None = None
    hsts_max_age: int = Field(63072000, ge=31536000)

    otel_service_name: str = Field("edge", validation_alias=AliasChoices("OTEL_SERVICE_NAME"))
    otel_exporter_otlp_endpoint: str | None = Field(
        None, validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    otel_exporter_otlp_traces_endpoint: str | None = Field(
        None, validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    otel_exporter_otlp_metrics_endpoint: str | None = Field(
        None, validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    )
    otel_traces_sampler: Sampler = Field(
        Sampler.parentbased_traceidratio, validation_alias=AliasChoices("OTEL_TRACES_SAMPLER")
    )
    otel_traces_sampler_arg: float = Field(
        1.0, ge=0, le=1, validation_alias=AliasChoices("OTEL_TRACES_SAMPLER_ARG")
    )

    api_path_prefixes: Annotated[list[str], NoDecode] = ["/api/"]
    max_body_bytes: int = Field(1024 * 1024, ge=1)
    max_header_count: int = Field(100, ge=10, le=1000)
    max_header_bytes: int = Field(32 * 1024, ge=1024, le=1024 * 1024)

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

    @field_validator(
        "cors_allow_origins",
        "cors_allow_methods",
        "cors_allow_headers",
        "cors_expose_headers",
        "rate_limit_key",
        mode="before",
    )
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        return split_comma_list(value)

    @field_validator(
        "otel_exporter_otlp_endpoint",
        "otel_exporter_otlp_traces_endpoint",
        "otel_exporter_otlp_metrics_endpoint",
    )
    @classmethod
    def _otlp_endpoint(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL (OTLP over HTTP)")
        return value or None

    @property
    def traces_export_enabled(self) -> bool:
        return bool(self.otel_exporter_otlp_endpoint or self.otel_exporter_otlp_traces_endpoint)

    @property
    def metrics_export_enabled(self) -> bool:
        return bool(self.otel_exporter_otlp_endpoint or self.otel_exporter_otlp_metrics_endpoint)

    @field_validator("cors_allow_methods")
    @classmethod
    def _methods_upper_case(cls, value: list[str]) -> list[str]:
        return [method.upper() for method in value]

    @field_validator("rate_limit_default")
    @classmethod
    def _rate_limit_notation(cls, value: str) -> str:
        return check_rate_limit(value)

    @field_validator("rate_limit_key")
    @classmethod
    def _rate_limit_key_parts(cls, value: list[str]) -> list[str]:
        return check_rate_limit_key(value)

    @field_validator("rate_limit_storage_url")
    @classmethod
    def _storage_scheme(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in STORAGE_SCHEMES:
            raise ValueError(f"must start with one of {', '.join(s + '://' for s in STORAGE_SCHEMES)}")
        return value

    @model_validator(mode="after")
    def _safe_cors(self) -> EdgeSettings:
        check_cors_origins(self.cors_allow_origins, self.cors_allow_credentials, self.environment)
        return self


def check_rate_limit(value: str) -> str:
    """`limits` notation, several limits separated by `;`: `10/minute;200/day`, or `off`."""
    if value.strip().lower() == "off":
        return "off"
    try:
        parse_many(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a rate limit such as 120/minute or 10/minute;200/day") from None
    return value


def check_rate_limit_key(parts: list[str]) -> list[str]:
    """Key parts, normalised: `client`, `route`, `header:<lower-case name>`."""
    normalised = []
    for part in parts:
        kind, _, name = part.partition(":")
        kind = kind.strip().lower()
        if kind in ("client", "route") and not name:
            normalised.append(kind)
        elif kind == "header" and name.strip():
            normalised.append(f"header:{name.strip().lower()}")
        else:
            raise ValueError(f"{part!r} is not a key part: client, route or header:<name>")
    if not normalised:
        raise ValueError("needs at least one part")
    return normalised


def check_cors_origins(origins: list[str], credentials: bool, environment: Environment) -> None:
    if "*" in origins:
        if credentials:
            raise ValueError("EDGE_CORS_ALLOW_ORIGINS may not be * with EDGE_CORS_ALLOW_CREDENTIALS=true")
        if environment == Environment.production:
            raise ValueError("EDGE_CORS_ALLOW_ORIGINS may not be * when ENVIRONMENT=production")
        if len(origins) > 1:
            raise ValueError("EDGE_CORS_ALLOW_ORIGINS: * stands alone")
        return
    for origin in origins:
        parts = urlsplit(origin)
        host = parts.hostname or ""
        wildcard = host.startswith("*.")
        if (
            parts.scheme not in ("http", "https")
            or not host
            or parts.path
            or parts.query
            or parts.fragment
            or "*" in host.removeprefix("*.")
            or (wildcard and "." not in host[2:])
        ):
            raise ValueError(
                f"EDGE_CORS_ALLOW_ORIGINS: {origin!r} is not an origin such as https://app.example.com "
                "or https://*.example.com"
            )


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
        message = problem["msg"].removeprefix("Value error, ")
        if not problem["loc"]:  # a rule across settings: its message names them
            lines.setdefault(message, f"  {message}")
            continue
        variable = environment_variable(settings_class, str(problem["loc"][0]))
        value = problem.get("input")
        shown = f" (got {value!r})" if isinstance(value, str | int | float) else ""
        lines.setdefault(variable, f"  {variable}: {message}{shown}")
    return "invalid configuration:\n" + "\n".join(lines.values())


def load_settings() -> EdgeSettings:
    try:
        return EdgeSettings()
    except ValidationError as error:
        raise ConfigurationError(describe_validation_error(EdgeSettings, error)) from None
