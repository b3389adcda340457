"""The simulator's configuration: `SIM_`-prefixed variables, read once and validated at start-up.

The conventions are the project's (common/settings.py): an invalid value stops the start-up
with a message naming the variable, and `python -m sim` exits with status 2.
"""

from __future__ import annotations

import shutil
from enum import StrEnum

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.settings import LogLevel, load


class SpeechEngine(StrEnum):
    """Where the speech audio comes from: `auto` uses espeak-ng when it is installed."""

    auto = "auto"
    espeak_ng = "espeak-ng"
    tone = "tone"


class Mp3Encoder(StrEnum):
    """How MP3 is made: `auto` uses lame when it is installed, else silent frames."""

    auto = "auto"
    lame = "lame"
    silent = "silent"


class Profile(StrEnum):
    """How long the simulated providers take (sim/latency.py): `instant` adds nothing,
    `realistic` takes the providers' published times."""

    instant = "instant"
    realistic = "realistic"


class SimSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SIM_", frozen=True, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(9100, ge=1, le=65535)
    # Prometheus text at /metrics on a port of its own (docs/metrics.md).
    metrics_port: int | None = Field(None, ge=1, le=65535)
    log_level: LogLevel = LogLevel.info

    # Added to every provider call, before it is answered; per-route latency adds to it.
    latency_ms: int = Field(0, ge=0, le=600_000)

    # The providers' own working time. The SIM_REALISTIC_* figures are read under `realistic`
    # only; each one that is set replaces that figure of every model's (docs/simulator.md).
    profile: Profile = Profile.instant
    realistic_ttft_ms: int | None = Field(None, ge=0, le=600_000)
    realistic_tokens_per_second: float | None = Field(None, gt=0, le=1_000_000)
    realistic_transcription_overhead_ms: int = Field(300, ge=0, le=600_000)
    realistic_transcription_speed_factor: float | None = Field(None, gt=0, le=1_000_000)
    realistic_ttfb_ms: int | None = Field(None, ge=0, le=600_000)
    realistic_synthesis_speed: float | None = Field(None, gt=0, le=1_000_000)

    # Unset: any key is accepted (but one must be sent, as the real APIs require).
    groq_api_key: SecretStr | None = None
    elevenlabs_api_key: SecretStr | None = None

    # Groq's per-model budgets, counted down in the x-ratelimit-* headers; 429 when spent.
    groq_requests_per_minute: int = Field(1000, ge=1)
    groq_tokens_per_minute: int = Field(100_000, ge=1)

    # ElevenLabs' plan limit on requests in flight at once (Starter: 3).
    elevenlabs_max_concurrent: int = Field(3, ge=1, le=1000)

    speech_engine: SpeechEngine = SpeechEngine.auto
    espeak_command: str = Field("espeak-ng", min_length=1)
    mp3_encoder: Mp3Encoder = Mp3Encoder.auto
    lame_command: str = Field("lame", min_length=1)

    @model_validator(mode="after")
    def _requested_tools_exist(self) -> SimSettings:
        if self.metrics_port == self.port:
            raise ValueError(f"SIM_METRICS_PORT={self.metrics_port} is SIM_PORT: give metrics a port of their own")
        if self.speech_engine is SpeechEngine.espeak_ng and shutil.which(self.espeak_command) is None:
            raise ValueError(
                f"SIM_SPEECH_ENGINE=espeak-ng but SIM_ESPEAK_COMMAND ({self.espeak_command!r}) "
                "is not an executable on PATH; install espeak-ng or use auto or tone"
            )
        if self.mp3_encoder is Mp3Encoder.lame and shutil.which(self.lame_command) is None:
            raise ValueError(
                f"SIM_MP3_ENCODER=lame but SIM_LAME_COMMAND ({self.lame_command!r}) "
                "is not an executable on PATH; install lame or use auto or silent"
            )
        return self

    @property
    def uses_espeak(self) -> bool:
        if self.speech_engine is SpeechEngine.auto:
            return shutil.which(self.espeak_command) is not None
        return self.speech_engine is SpeechEngine.espeak_ng

    @property
    def uses_lame(self) -> bool:
        if self.mp3_encoder is Mp3Encoder.auto:
            return shutil.which(self.lame_command) is not None
        return self.mp3_encoder is Mp3Encoder.lame


def load_settings() -> SimSettings:
    """The settings from the environment; `ConfigurationError` names the variable at fault."""
    return load(SimSettings)
