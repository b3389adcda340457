"""Resilience policies: one typed, validated `HostPolicy` per provider, read once.

`OutboundSettings` holds the policies for the app's known providers and a `default` for
every other host. Each provider's defaults come from what that provider does (see
docs/resilience.md); an environment variable changes one field and keeps the provider's
other defaults, e.g. `APP_OUTBOUND_GROQ__MAX_RETRIES=1`. A variable naming a policy that
does not exist (`APP_OUTBOUND_GROQQ__...`) is refused, as is a field that does not.
"""

from __future__ import annotations

import os
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class HostPolicy(BaseModel):
    """How calls to one provider at its upstream are bounded, retried and cut off. Times in seconds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Timeouts: an attempt is bounded, the whole call (waits and retries included) too.
    # until the response head; also the longest silence while reading its body
    attempt_timeout: float = Field(10.0, gt=0)
    total_deadline: float = Field(30.0, gt=0)
    connect_timeout: float = Field(3.0, gt=0)

    # Bulkhead: calls in flight at once, and how long a call may queue for a slot.
    max_concurrency: int = Field(32, ge=1)
    bulkhead_wait: float = Field(1.0, ge=0)

    # Breaker: trips when the failure rate over the last `window_size` calls (none older
    # than `window_seconds`) reaches the threshold, once `minimum_calls` have been seen.
    failure_rate_threshold: float = Field(0.5, gt=0, le=1)
    minimum_calls: int = Field(10, ge=1)
    window_size: int = Field(20, ge=1)
    window_seconds: float = Field(60.0, gt=0)
    open_seconds: float = Field(15.0, gt=0)
    half_open_probes: int = Field(1, ge=1)

    # Retries: exponential backoff with full jitter, within a budget per host.
    max_retries: int = Field(2, ge=0)
    backoff_base: float = Field(0.2, gt=0)
    backoff_max: float = Field(2.0, gt=0)
    retry_budget_ratio: float = Field(0.2, ge=0, le=1)
    retry_budget_min: int = Field(3, ge=0)  # retries always allowed per budget window, for quiet hosts
    retry_after_cap: float = Field(60.0, gt=0)
    all_methods_idempotent: bool = False  # the API is idempotent whatever the method (Qdrant)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        problems: list[str] = []
        if self.attempt_timeout > self.total_deadline:
            problems.append(
                f"attempt_timeout ({self.attempt_timeout:g} s) is longer than total_deadline "
                f"({self.total_deadline:g} s): no attempt could ever use its full timeout"
            )
        if self.connect_timeout > self.attempt_timeout:
            problems.append(
                f"connect_timeout ({self.connect_timeout:g} s) is longer than attempt_timeout "
                f"({self.attempt_timeout:g} s)"
            )
        if self.minimum_calls > self.window_size:
            problems.append(
                f"minimum_calls ({self.minimum_calls}) is larger than window_size ({self.window_size}): "
                "the breaker could never trip"
            )
        # Polly refuses a sampling window under twice the attempt timeout: a shorter window
        # forgets a timed-out call's neighbours before the timeout is even recorded.
        if self.window_seconds < 2 * self.attempt_timeout:
            problems.append(
                f"window_seconds ({self.window_seconds:g} s) is shorter than twice attempt_timeout "
                f"({self.attempt_timeout:g} s)"
            )
        if self.backoff_base > self.backoff_max:
            problems.append(
                f"backoff_base ({self.backoff_base:g} s) is larger than backoff_max ({self.backoff_max:g} s)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


# Groq: the app's completions (at most 512 tokens) and transcriptions take a second or two,
# so attempts get 8 s: within a turn's step budget (9 s), so that a hung call times out as
# a failure the breaker counts, not as a deadline. Limits are per organisation and per
# minute, so a 429's Retry-After is under a minute. The cap on concurrent calls only bounds
# what an outage can tie up; Groq limits rates, not concurrency.
GROQ = HostPolicy(
    attempt_timeout=8.0,
    total_deadline=20.0,
    connect_timeout=3.0,
    max_concurrency=32,
    bulkhead_wait=5.0,
    window_seconds=120.0,
    open_seconds=30.0,
    backoff_base=0.5,
    backoff_max=4.0,
    retry_after_cap=60.0,
)

# ElevenLabs limits concurrent requests per plan (Starter: 3) and answers a 4th with 429,
# so calls queue here for a slot instead. The app's replies are a few sentences, spoken in
# about a second: attempts get 6 s, within the speech step's budget (7 s).
ELEVENLABS = HostPolicy(
    attempt_timeout=6.0,
    total_deadline=16.0,
    connect_timeout=3.0,
    max_concurrency=3,
    bulkhead_wait=10.0,
    window_seconds=120.0,
    open_seconds=15.0,
    backoff_base=0.5,
    backoff_max=4.0,
    retry_after_cap=30.0,
)

# Qdrant: our own server, answering in milliseconds; every REST call is idempotent (points
# are upserted by id, searches are read-only POSTs), so any method may be retried.
QDRANT = HostPolicy(
    attempt_timeout=2.0,
    total_deadline=5.0,
    connect_timeout=1.0,
    max_concurrency=32,
    bulkhead_wait=0.5,
    window_seconds=30.0,
    open_seconds=5.0,
    backoff_base=0.05,
    backoff_max=0.5,
    retry_after_cap=5.0,
    all_methods_idempotent=True,
)


ENV_PREFIX = "APP_OUTBOUND_"


class OutboundSettings(BaseSettings):
    """The policies by name; `default` serves every host not registered under another name."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        # One variable changes one field and keeps that provider's other defaults.
        nested_model_default_partial_update=True,
        frozen=True,
        extra="ignore",
    )

    default: HostPolicy = HostPolicy()
    groq: HostPolicy = GROQ
    elevenlabs: HostPolicy = ELEVENLABS
    qdrant: HostPolicy = QDRANT

    @model_validator(mode="after")
    def _no_unknown_policy(self) -> Self:
        # pydantic-settings reads only the variables of known fields: one naming no policy
        # would be ignored, and the provider would run on its defaults unnoticed.
        unknown = sorted(
            name
            for name in os.environ
            if name.upper().startswith(ENV_PREFIX)
            and name[len(ENV_PREFIX) :].split("__")[0].lower() not in type(self).model_fields
        )
        if unknown:
            known = ", ".join(field.upper() for field in type(self).model_fields)
            raise ValueError(f"{', '.join(unknown)}: no such outbound policy (the policies are {known})")
        return self

    def policy_named(self, name: str) -> HostPolicy:
        """The policy for `name`; names without a policy of their own get `default`."""
        if name in ("groq", "elevenlabs", "qdrant"):
            policy: HostPolicy = getattr(self, name)
            return policy
        return self.default
