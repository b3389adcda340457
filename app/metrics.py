"""The app's Prometheus series (docs/metrics.md#the-app), built once per app on its own
registry and served at `/metrics` on `APP_METRICS_PORT` (common/metrics.py).

Turns are counted where their outcome is known (app/companion.py), HTTP requests by the
matched route template, never the raw path (which holds session and audio ids).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.metrics import DURATION_BUCKETS, request_duration

BREAKER_STATES = ("closed", "open", "half_open")
# A sweep takes milliseconds with nothing to delete, minutes with a backlog of thousands.
SWEEP_BUCKETS = (0.01, 0.1, 1, 10, 60, 300, 1800)


class BreakerStates(Collector):
    """`app_breaker_state`: 1 for each provider's current breaker state, 0 for the others,
    read when scraped (as resilience4j reports it: "any breaker open" is a sum)."""

    def __init__(self, states: Callable[[], Mapping[str, str]]) -> None:
        self.states = states

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "app_breaker_state", "1 for each provider's current breaker state", labels=["provider", "state"]
        )
        for provider, current in sorted(self.states().items()):
            for state in BREAKER_STATES:
                family.add_metric([provider, state], int(state == current))
        yield family


@dataclass(frozen=True)
class AppMetrics:
    request_duration: Histogram
    turns: Counter
    turn_duration: Histogram
    stage_duration: Histogram
    sessions_started: Counter
    sessions_deleted: Counter
    sessions_expired: Counter
    audio_expired: Counter
    sweep_duration: Histogram
    backups: Counter
    backup_last_success: Gauge
    backup_bytes: Gauge
    memories_written: Counter
    memories_recalled: Counter
    degradations: Counter
    groq_tokens: Counter
    groq_audio_seconds: Counter
    elevenlabs_characters: Counter
    readiness: Gauge

    @classmethod
    def build(cls, registry: CollectorRegistry) -> AppMetrics:
        return cls(
            request_duration=request_duration(registry),
            turns=Counter("app_turns", "Turns taken, by kind and outcome", ["kind", "outcome"], registry=registry),
            turn_duration=Histogram(
                "app_turn_duration_seconds",
                "A turn from its start to its answer",
                ["kind"],
                buckets=DURATION_BUCKETS,
                registry=registry,
            ),
            stage_duration=Histogram(
                "app_turn_stage_duration_seconds",
                "Each step of a turn",
                ["stage"],
                buckets=DURATION_BUCKETS,
                registry=registry,
            ),
            sessions_started=Counter("app_sessions_started", "Sessions created", registry=registry),
            sessions_deleted=Counter("app_sessions_deleted", "Sessions deleted by their owner", registry=registry),
            sessions_expired=Counter("app_sessions_expired", "Sessions removed by retention", registry=registry),
            audio_expired=Counter("app_audio_expired", "Reply audio removed by its own retention", registry=registry),
            sweep_duration=Histogram(
                "app_sweep_duration_seconds",
                "A retention sweep this process ran, start to end",
                buckets=SWEEP_BUCKETS,
                registry=registry,
            ),
            backups=Counter(
                "app_backups", "Backups this process attempted, by outcome", ["outcome"], registry=registry
            ),
            backup_last_success=Gauge(
                "app_backup_last_success_timestamp_seconds",
                "When the newest verified backup was taken (the process's start while there is none)",
                registry=registry,
            ),
            backup_bytes=Gauge("app_backup_bytes", "The newest backup's size", registry=registry),
            memories_written=Counter("app_memories_written", "Memories stored", registry=registry),
            memories_recalled=Counter("app_memories_recalled", "Memories put in a prompt", registry=registry),
            degradations=Counter(
                "app_degradations", "Turns answered with less than everything", ["kind"], registry=registry
            ),
            groq_tokens=Counter(
                "app_groq_tokens", "Groq tokens as its usage reports them", ["model", "direction"], registry=registry
            ),
            groq_audio_seconds=Counter(
                "app_groq_audio_seconds", "Audio transcribed by Groq (billed per second)", ["model"], registry=registry
            ),
            elevenlabs_characters=Counter(
                "app_elevenlabs_characters",
                "Characters sent to ElevenLabs (billed per character)",
                ["model"],
                registry=registry,
            ),
            readiness=Gauge("readiness_status", "1 while the readiness check passes", registry=registry),
        )
