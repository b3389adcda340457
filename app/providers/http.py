"""One way to turn an outbound HTTP exchange into an answer or a provider error.

What is worth trying again later is the outbound transport's to say: its retryable
statuses, and the wait a failed response asked for, read and capped by the provider's
policy (docs/resilience.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx

from app.outbound import RETRY_AFTER_EXTENSION, RETRYABLE_STATUSES, BreakerOpen, HostRateLimited
from app.providers.errors import ProviderRejected, ProviderUnavailable


async def exchange(provider: str, send: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response:
    """Runs `send`; returns a 2xx response or raises a ProviderError saying what went wrong.

    Failures never carry the provider's body or address into the error's reason: it ends
    up in logs, and a message built from it could end up in front of a user.
    """
    try:
        response = await send()
    except httpx.TimeoutException:
        raise ProviderUnavailable(provider, "timed out") from None
    except (BreakerOpen, HostRateLimited) as refused:
        raise ProviderUnavailable(provider, type(refused).__name__, refused.retry_after) from None
    except httpx.TransportError as exc:
        raise ProviderUnavailable(provider, type(exc).__name__) from None
    if response.is_success:
        return response
    await response.aread()
    if response.status_code in RETRYABLE_STATUSES:
        retry_after: float | None = response.extensions.get(RETRY_AFTER_EXTENSION)
        raise ProviderUnavailable(provider, f"status {response.status_code}", retry_after)
    raise ProviderRejected(provider, f"status {response.status_code}")
