"""One way to turn an outbound HTTP exchange into an answer or a provider error."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Awaitable, Callable

import httpx

from app.providers.errors import ProviderRejected, ProviderUnavailable

# Statuses worth trying again later; Groq answers 498 when it is over capacity.
UNAVAILABLE_STATUSES = frozenset({408, 429, 498, 500, 502, 503, 504})


async def exchange(provider: str, send: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response:
    """Runs `send`; returns a 2xx response or raises a ProviderError saying what went wrong.

    Failures never carry the provider's body or address into the error's reason: it ends
    up in logs, and a message built from it could end up in front of a user.
    """
    try:
        response = await send()
    except httpx.TimeoutException:
        raise ProviderUnavailable(provider, "timed out") from None
    except httpx.TransportError as exc:
        # The outbound transport's own refusals (breaker open, host rate-limited, bulkhead
        # full) carry how long to wait.
        raise ProviderUnavailable(provider, type(exc).__name__, getattr(exc, "retry_after", None)) from None
    if response.is_success:
        return response
    await response.aread()
    if response.status_code in UNAVAILABLE_STATUSES:
        raise ProviderUnavailable(provider, f"status {response.status_code}", retry_after(response))
    raise ProviderRejected(provider, f"status {response.status_code}")


def retry_after(response: httpx.Response) -> float | None:
    """`retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    milliseconds = response.headers.get("retry-after-ms")
    if milliseconds:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())
