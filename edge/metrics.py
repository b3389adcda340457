"""The edge's Prometheus series (docs/metrics.md#the-edge), built once per edge on its
registry; each concern is handed the few it records and knows nothing of the others.

Gauges say how workers add up when `EDGE_WORKERS` > 1 (prometheus-client's multiprocess
modes): pool connections are summed over live workers, a degraded store is the worst of
them, readiness the least ready.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.metrics import request_duration


@dataclass(frozen=True)
class EdgeMetrics:
    request_duration: Histogram
    rate_limit_decisions: Counter
    rate_limit_store_errors: Counter
    rate_limit_store_degraded: Gauge
    rate_limit_store_degraded_seconds: Counter
    errors: Counter
    upstream_connections: Gauge
    readiness: Gauge

    @classmethod
    def build(cls, registry: CollectorRegistry) -> EdgeMetrics:
        return cls(
            request_duration=request_duration(registry),
            rate_limit_decisions=Counter(
                "edge_rate_limit_decisions", "Rate-limit verdicts", ["rule", "outcome"], registry=registry
            ),
            rate_limit_store_errors=Counter(
                "edge_rate_limit_store_errors", "Failed calls to the rate-limit store", ["error"], registry=registry
            ),
            rate_limit_store_degraded=Gauge(
                "edge_rate_limit_store_degraded",
                "1 while the rate-limit store is left alone after failures",
                registry=registry,
                multiprocess_mode="livemax",
            ),
            rate_limit_store_degraded_seconds=Counter(
                "edge_rate_limit_store_degraded_seconds", "Time the rate-limit store was degraded", registry=registry
            ),
            errors=Counter("edge_errors", "Errors the edge answered itself, by code", ["code"], registry=registry),
            upstream_connections=Gauge(
                "edge_upstream_connections",
                "Upstream connections by state",
                ["state"],
                registry=registry,
                multiprocess_mode="livesum",
            ),
            readiness=Gauge(
                "readiness_status", "1 while the readiness check passes", registry=registry, multiprocess_mode="livemin"
            ),
        )
