"""The edge's configuration: read once from the environment, validated at start-up.

Every setting is documented in docs/configuration.md (a test keeps the two in sync).
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from limits import parse_many
from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from common.error_tracking import check_error_tracking
from common.settings import Environment, LogLevel, OtelSettings, load, refuse_in_production, split_comma_list

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class RateLimitStrategy(StrEnum):
    moving_window = "moving-window"
    sliding_window_counter = "sliding-window-counter"
    fixed_window = "fixed-window"


class StoreErrorPolicy(StrEnum):
    open = "open"
    closed = "closed"


STORAGE_SCHEMES = ("memory", "redis", "rediss", "redis+cluster", "redis+sentinel")


class EdgeSettings(OtelSettings):
    model_config = SettingsConfigDict(env_prefix="EDGE_", frozen=True, extra="ignore", populate_by_name=True)

    environment: Environment = Field(Environment.development, validation_alias=AliasChoices("ENVIRONMENT"))
    upstream_url: str = "http://127.0.0.1:8000"
    host: str = "0.0.0.0"  # noqa: S104 - the edge is the public entry point
    port: int = Field(8080, ge=1, le=65535, validation_alias=AliasChoices("EDGE_PORT", "PORT"))
    workers: int = Field(1, ge=1, le=64)
    # Prometheus text at /metrics on a port of its own, never the public one (docs/metrics.md).
    metrics_port: int | None = Field(None, ge=1, le=65535)
    upstream_connect_timeout: float = Field(5.0, gt=0)
    upstream_read_timeout: float = Field(90.0, gt=0)
    upstream_idle_timeout: float = Field(4.0, gt=0)
    upstream_pool_size: int = Field(100, ge=1)
    upstream_resolve_interval: float = Field(5.0, gt=0)
    upstream_eject_time: float = Field(5.0, gt=0)
    upstream_max_tries: int = Field(3, ge=1, le=16)
    trusted_proxies: Annotated[list[IPNetwork], NoDecode] = []
    client_keep_alive_timeout: float = Field(75.0, gt=0)
    client_header_timeout: float = Field(10.0, gt=0, le=300)
    client_body_timeout: float = Field(10.0, gt=0, le=300)
    client_body_min_rate: int = Field(1024, ge=0)
    client_write_timeout: float = Field(30.0, gt=0, le=3600)
    max_connections_per_client: int = Field(64, ge=1)
    max_exchanges_per_client: int = Field(16, ge=1)
    request_buffer_bytes: int = Field(64 * 1024, ge=0, le=16 * 1024 * 1024)
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
    # Error tracking (docs/error-tracking.md): off while SENTRY_DSN is unset or empty.
    sentry_dsn: SecretStr | None = Field(None, validation_alias=AliasChoices("SENTRY_DSN"))
    sentry_release: str | None = Field(None, validation_alias=AliasChoices("SENTRY_RELEASE"))

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
        "api_path_prefixes",
        mode="before",
    )
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        return split_comma_list(value)

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
    def _metrics_not_on_the_public_port(self) -> EdgeSettings:
        if self.metrics_port == self.port:
            raise ValueError(
                f"EDGE_METRICS_PORT={self.metrics_port} is the public port: give metrics a port of their own"
            )
        return self

    @model_validator(mode="after")
    def _error_tracking(self) -> EdgeSettings:
        check_error_tracking(self)
        return self

    @model_validator(mode="after")
    def _safe_cors(self) -> EdgeSettings:
        check_cors_origins(self.cors_allow_origins, self.cors_allow_credentials)
        return self

    @model_validator(mode="after")
    def _safe_in_production(self) -> EdgeSettings:
        unsafe = []
        if "*" in self.cors_allow_origins:
            unsafe.append("EDGE_CORS_ALLOW_ORIGINS=*: any site's pages could call the API; name the origins")
        if self.log_level is LogLevel.debug:
            unsafe.append("EDGE_LOG_LEVEL=debug: debug lines carry the libraries' detail of every exchange; use info")
        if self.workers > 1 and urlsplit(self.rate_limit_storage_url).scheme == "memory":
            unsafe.append(
                f"EDGE_WORKERS={self.workers} with EDGE_RATE_LIMIT_STORAGE_URL=memory://: each worker counts on "
                f"its own, so every limit would admit {self.workers} times what it says; share the counters "
                "in Redis (redis://...) or run one worker"
            )
        refuse_in_production(self.environment, unsafe)
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
            header = name.strip().lower()
            if _dropped_at_ingress(header):
                raise ValueError(
                    f"{part!r}: the edge removes that header before limiting (forwarding, hop-by-hop, "
                    "client-address headers and names with underscores), so every client would share one bucket"
                )
            normalised.append(f"header:{header}")
        else:
            raise ValueError(f"{part!r} is not a key part: client, route or header:<name>")
    if not normalised:
        raise ValueError("needs at least one part")
    return normalised


def _dropped_at_ingress(header: str) -> bool:
    # Imported here: the proxy package imports this module (`IPNetwork`) at import time.
    from edge.proxy.headers import CLIENT_CLAIMS, FORWARDING, REQUEST_HOP_BY_HOP

    name = header.encode("latin-1")
    return "_" in header or name in CLIENT_CLAIMS | FORWARDING | REQUEST_HOP_BY_HOP


def check_cors_origins(origins: list[str], credentials: bool) -> None:
    if "*" in origins:
        if credentials:
            raise ValueError("EDGE_CORS_ALLOW_ORIGINS may not be * with EDGE_CORS_ALLOW_CREDENTIALS=true")
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


def load_settings() -> EdgeSettings:
    return load(EdgeSettings)
