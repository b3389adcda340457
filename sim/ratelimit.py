"""Groq's per-model budgets and its `x-ratelimit-*` headers.

Groq limits requests and tokens per organisation and model, reports what is left on every
response and answers 429 with `retry-after` once a budget is spent. The simulator counts
both budgets per minute in a fixed window per model that starts with the window's first
call. (Groq's request headers describe the per-day budget; per minute keeps the numbers
testable.) The headers depend on the clock; the replies never do.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

WINDOW_SECONDS = 60.0


def go_duration(seconds: float) -> str:
    """A duration as Groq writes it (Go's format): `7.66s`, `2m59.56s`, `0s`."""
    seconds = max(0.0, round(seconds, 2))
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.2f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


@dataclass
class Window:
    started: float
    requests: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class Verdict:
    """Whether a call fits its model's budget, and the headers that say what is left."""

    allowed: bool
    headers: dict[str, str]
    retry_after_seconds: int
    exhausted: str  # "requests" or "tokens" when not allowed


class Budgets:
    def __init__(self, requests_per_minute: int, tokens_per_minute: int) -> None:
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.windows: dict[str, Window] = {}

    def reset(self) -> None:
        self.windows.clear()

    def _window(self, model: str, now: float) -> Window:
        window = self.windows.get(model)
        if window is None or now - window.started >= WINDOW_SECONDS:
            window = self.windows[model] = Window(now)
        return window

    def charge(self, model: str, tokens: int) -> Verdict:
        """Takes one request and `tokens` from the model's budget, if both fit."""
        now = time.monotonic()
        window = self._window(model, now)
        reset_in = window.started + WINDOW_SECONDS - now
        exhausted = ""
        if window.requests + 1 > self.requests_per_minute:
            exhausted = "requests"
        elif window.tokens + tokens > self.tokens_per_minute:
            exhausted = "tokens"
        else:
            window.requests += 1
            window.tokens += tokens
        headers = {
            "x-ratelimit-limit-requests": str(self.requests_per_minute),
            "x-ratelimit-remaining-requests": str(self.requests_per_minute - window.requests),
            "x-ratelimit-reset-requests": go_duration(reset_in if window.requests else 0),
            "x-ratelimit-limit-tokens": str(self.tokens_per_minute),
            "x-ratelimit-remaining-tokens": str(self.tokens_per_minute - window.tokens),
            "x-ratelimit-reset-tokens": go_duration(reset_in if window.tokens else 0),
        }
        return Verdict(not exhausted, headers, max(1, math.ceil(reset_in)), exhausted)
