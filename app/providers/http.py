"""One way to turn an outbound HTTP exchange into an answer or a provider error, and to read
a streamed answer's body within the call's deadline.

What is worth trying again later is the outbound transport's to say: its retryable
statuses, and the wait a failed response asked for, read and capped by the provider's
policy (docs/resilience.md). A streamed body's breaker outcome is the transport's too: a
body that breaks off or goes silent past the read timeout is a failure there (its
`GuardedBody`), one the caller closes early, or the deadline cuts, is not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx

from app.outbound import RETRY_AFTER_EXTENSION, RETRYABLE_STATUSES, BreakerOpen, HostRateLimited
from app.providers.errors import ProviderRejected, ProviderUnavailable


async def exchange(provider: str, send: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response:
    """Runs `send`; returns a 2xx response or raises a ProviderError saying what went wrong.

    `send` may ask for a streamed response (`client.send(request, stream=True)`): a refusal
    is then known from the head, before any of the body, and the response is closed.
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
    # A stream's error body is closed unread (a whole one was read already): the status is all
    # that is used of it.
    await response.aclose()
    if response.status_code in RETRYABLE_STATUSES:
        retry_after: float | None = response.extensions.get(RETRY_AFTER_EXTENSION)
        raise ProviderUnavailable(provider, f"status {response.status_code}", retry_after)
    raise ProviderRejected(provider, f"status {response.status_code}")


def ends_at(deadline: float) -> float:
    """The instant, on the running event loop's clock, `deadline` seconds from now."""
    return asyncio.get_running_loop().time() + deadline


async def next_piece(provider: str, pieces: AsyncIterator[bytes], until: float) -> bytes | None:
    """The next piece of a streamed body (`response.aiter_bytes()`), None at its end.

    The read may last until `until` (`ends_at`): a stream still going then ends with
    ProviderUnavailable "timed out", as does one the transport's read timeout stopped; a
    body that breaks off ends with ProviderUnavailable naming the error's type.
    """
    # Checked first: a piece already buffered would be returned without the timeout firing.
    if asyncio.get_running_loop().time() >= until:
        raise ProviderUnavailable(provider, "timed out")
    try:
        async with asyncio.timeout_at(until):
            return await anext(pieces)
    except StopAsyncIteration:
        return None
    except (TimeoutError, httpx.TimeoutException):
        raise ProviderUnavailable(provider, "timed out") from None
    except httpx.TransportError as exc:
        raise ProviderUnavailable(provider, type(exc).__name__) from None
