"""The shared outbound transport: every call the app makes to another service goes through
`Outbound`'s clients, which share one breaker-, retry-, bulkhead- and deadline-aware httpx
transport. Nothing here knows about the app; see docs/resilience.md."""

from app.outbound.classify import RETRYABLE_STATUSES
from app.outbound.errors import BreakerOpen, BulkheadFull, DeadlineExceeded, HostRateLimited, OutboundError
from app.outbound.factory import Outbound
from app.outbound.policy import HostPolicy, OutboundSettings
from app.outbound.transport import (
    DEADLINE_EXTENSION,
    IDEMPOTENT_EXTENSION,
    PROVIDER_EXTENSION,
    RETRY_AFTER_EXTENSION,
    ResilientTransport,
)

__all__ = [
    "DEADLINE_EXTENSION",
    "IDEMPOTENT_EXTENSION",
    "PROVIDER_EXTENSION",
    "RETRYABLE_STATUSES",
    "RETRY_AFTER_EXTENSION",
    "BreakerOpen",
    "BulkheadFull",
    "DeadlineExceeded",
    "HostPolicy",
    "HostRateLimited",
    "Outbound",
    "OutboundError",
    "OutboundSettings",
    "ResilientTransport",
]
