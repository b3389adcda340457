"""What a provider call can end in, besides an answer."""

from __future__ import annotations


class ProviderError(Exception):
    """A provider could not give an answer. `retry_after` is a hint in seconds, if known."""

    def __init__(self, provider: str, reason: str, retry_after: float | None = None) -> None:
        super().__init__(f"{provider}: {reason}")
        self.provider = provider
        self.reason = reason
        self.retry_after = retry_after


class ProviderUnavailable(ProviderError):
    """Down, overloaded, rate-limited or too slow: worth trying again later."""


class ProviderRejected(ProviderError):
    """The provider refused the request itself (bad key, bad input): retrying will not help."""
