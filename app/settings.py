"""The internal app's configuration: read once from the environment, validated at start-up.

Every setting is documented in docs/configuration.md (a test keeps the two in sync). The
app knows nothing of edge concerns: no CORS, rate limit, security-header or size-limit
settings live here, only what the app itself needs (its own upload cap protects the
transcriber's 25 MB limit and the app's memory even when it runs without the edge). The
feature flags (`APP_FEATURE_*`) are read here once, like everything else, and what they
switch off is not opened at all (docs/app.md#feature-flags).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from common.error_tracking import check_error_tracking
from common.settings import Environment, LogLevel, OtelSettings, load, refuse_in_production

# What `make run` and the compose stack give the simulator, which accepts any key: never a
# provider's key.
SIMULATED_KEY = "simulated"


def _api_docs_by_default(validated: dict[str, Any]) -> bool:
    # The API's documentation is a development aid; a deployment publishes it on purpose.
    return validated.get("environment") is Environment.development


class AppSettings(OtelSettings):
    model_config = SettingsConfigDict(env_prefix="APP_", frozen=True, extra="ignore", populate_by_name=True)

    environment: Environment = Field(Environment.development, validation_alias=AliasChoices("ENVIRONMENT"))
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Prometheus text at /metrics on a port of its own (docs/metrics.md).
    metrics_port: int | None = Field(None, ge=1, le=65535)
    data_dir: Path = Path("data")
    database_url: str | None = None
    qdrant_url: str | None = None
    qdrant_api_key: SecretStr | None = None
    log_level: LogLevel = LogLevel.info
    drain_timeout: int = Field(65, ge=0)
    # `uid:gid` a process started as root gives the data directory to and becomes.
    run_as_user: Annotated[tuple[int, int] | None, NoDecode] = None
    # The app cannot count its replicas (a platform tells each one its own id, not how many
    # there are): the operator says it, and the stores are checked against it.
    replicas: int = Field(1, ge=1, le=1000)

    # After `environment`: the documentation's default depends on it.
    feature_memory: bool = True
    feature_speech: bool = True
    feature_summaries: bool = True
    # `APP_DOCS_ENABLED` is the deployment plan's name for it; the flag's own name wins.
    feature_api_docs: bool = Field(
        default_factory=_api_docs_by_default,
        validation_alias=AliasChoices("APP_FEATURE_API_DOCS", "APP_DOCS_ENABLED"),
    )

    turn_timeout_s: float = Field(60.0, gt=0, le=600)
    # What each step's provider call may take, or what is left of the turn if that is less
    # (docs/resilience.md#a-turns-time): a hung provider costs its step's budget, not the turn.
    transcribe_budget_s: float = Field(9.0, gt=0, le=600)
    reply_budget_s: float = Field(9.0, gt=0, le=600)
    speak_budget_s: float = Field(7.0, gt=0, le=600)
    remember_budget_s: float = Field(9.0, gt=0, le=600)
    summarise_budget_s: float = Field(9.0, gt=0, le=600)
    max_audio_bytes: int = Field(10 * 1024 * 1024, ge=1024, le=25 * 1024 * 1024)
    max_audio_seconds: float = Field(120.0, gt=0, le=1800)
    max_text_chars: int = Field(2000, ge=1, le=20000)

    groq_api_key: SecretStr | None = Field(None, validation_alias=AliasChoices("GROQ_API_KEY"))
    groq_base_url: str = Field("https://api.groq.com/openai/v1", validation_alias=AliasChoices("GROQ_BASE_URL"))
    elevenlabs_api_key: SecretStr | None = Field(None, validation_alias=AliasChoices("ELEVENLABS_API_KEY"))
    elevenlabs_base_url: str = Field("https://api.elevenlabs.io", validation_alias=AliasChoices("ELEVENLABS_BASE_URL"))
    elevenlabs_voice_id: str = Field(
        "21m00Tcm4TlvDq8ikWAM",
        pattern=r"^[A-Za-z0-9]{1,64}$",
        validation_alias=AliasChoices("ELEVENLABS_VOICE_ID"),
    )
    chat_model: str = "llama-3.3-70b-versatile"
    memory_model: str = "llama-3.1-8b-instant"
    transcription_model: str = "whisper-large-v3-turbo"
    speech_model: str = "eleven_flash_v2_5"
    speech_output_format: str = "mp3_44100_128"

    # all-MiniLM-L6-v2 understands paraphrases; `hashing` matches wording only (no model).
    memory_embedder: Literal["all-MiniLM-L6-v2", "hashing"] = "all-MiniLM-L6-v2"
    memory_recall_limit: int = Field(5, ge=1, le=50)
    memory_duplicate_similarity: float = Field(0.97, gt=0, le=1)
    summarise_after_messages: int = Field(30, ge=6, le=1000)
    keep_recent_messages: int = Field(10, ge=2, le=100)
    session_retention_days: float = Field(7.0, gt=0)
    audio_retention_hours: float = Field(24.0, gt=0)
    # Backups (docs/data.md#backups): every this many hours inside the app, 0 for none.
    backup_interval_hours: float = Field(24.0, ge=0)
    backup_keep: int = Field(7, ge=1, le=1000)
    # Unset: `backups/` under APP_DATA_DIR (in production, another volume).
    backup_dir: Path | None = None
    restore_on_corruption: bool = False

    otel_service_name: str = Field("app", validation_alias=AliasChoices("OTEL_SERVICE_NAME"))
    # Error tracking (docs/error-tracking.md): off while SENTRY_DSN is unset or empty.
    sentry_dsn: SecretStr | None = Field(None, validation_alias=AliasChoices("SENTRY_DSN"))
    sentry_release: str | None = Field(None, validation_alias=AliasChoices("SENTRY_RELEASE"))

    @property
    def backups(self) -> Path:
        return self.backup_dir if self.backup_dir is not None else self.data_dir / "backups"

    @property
    def keeps_data_locally(self) -> bool:
        """SQLite or the embedded Qdrant: stores that one process at a time may open."""
        return self.database_url is None or (self.feature_memory and self.qdrant_url is None)

    @field_validator("run_as_user", mode="before")
    @classmethod
    def _uid_gid(cls, value: Any) -> Any:
        if isinstance(value, str):
            uid, separator, gid = value.partition(":")
            if not (separator and uid.isdigit() and gid.isdigit()):
                raise ValueError("must be uid:gid, two numbers (e.g. 10001:10001)")
            return int(uid), int(gid)
        return value

    @field_validator("groq_base_url", "elevenlabs_base_url", "qdrant_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("backup_dir", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("groq_api_key", "elevenlabs_api_key", "qdrant_api_key")
    @classmethod
    def _blank_key_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value().strip() else None

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if urlsplit(value).scheme not in ("postgres", "postgresql"):
            raise ValueError("must be a postgresql:// URL (SQLite under APP_DATA_DIR is used when unset)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AppSettings:
        problems = []
        if self.metrics_port == self.port:
            problems.append(f"APP_METRICS_PORT={self.metrics_port} is APP_PORT: give metrics a port of their own")
        if self.keep_recent_messages >= self.summarise_after_messages:
            problems.append("APP_KEEP_RECENT_MESSAGES must be below APP_SUMMARISE_AFTER_MESSAGES")
        if self.replicas > 1 and self.database_url is None:
            problems.append(
                f"APP_REPLICAS={self.replicas} needs APP_DATABASE_URL: each replica's own SQLite "
                "would hold its own sessions"
            )
        if self.replicas > 1 and self.feature_memory and self.qdrant_url is None:
            problems.append(
                f"APP_REPLICAS={self.replicas} with APP_FEATURE_MEMORY=true needs APP_QDRANT_URL: the "
                "embedded memory store is one process's"
            )
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    @model_validator(mode="after")
    def _error_tracking(self) -> AppSettings:
        check_error_tracking(self)
        return self

    @model_validator(mode="after")
    def _safe_in_production(self) -> AppSettings:
        # Each of these is found at start-up, not on the first turn or in a leaked log.
        unsafe = []
        providers = [("GROQ", self.groq_api_key, self.groq_base_url, "")]
        if self.feature_speech:  # no speech, no ElevenLabs
            providers.append(
                ("ELEVENLABS", self.elevenlabs_api_key, self.elevenlabs_base_url, ", or APP_FEATURE_SPEECH=false")
            )
        for provider, key, base_url, otherwise in providers:
            if key is None:
                unsafe.append(f"{provider}_API_KEY unset: set the provider's key in the platform's secrets{otherwise}")
            elif key.get_secret_value().strip().lower() == SIMULATED_KEY:
                unsafe.append(f"{provider}_API_KEY={SIMULATED_KEY}: the simulator's placeholder, not a key")
            if urlsplit(base_url).scheme == "http":
                unsafe.append(f"{provider}_BASE_URL=http://...: the key would cross the network unencrypted")
        if self.log_level is LogLevel.debug:
            unsafe.append(
                "APP_LOG_LEVEL=debug: the libraries' debug lines carry what people say "
                "(database statements' parameters, provider exchanges); use info"
            )
        if self.feature_api_docs:
            unsafe.append(
                "APP_FEATURE_API_DOCS=true (or APP_DOCS_ENABLED=true): "
                "the API's documentation is not published in production"
            )
        refuse_in_production(self.environment, unsafe)
        return self


def load_settings() -> AppSettings:
    return load(AppSettings)
