"""In-process counters for `limits`, cheap whatever the limit and however many clients.

`limits`' own async memory storage inserts at the front of a list on every hit (a cost
that grows with the limit) and, after every hit, sweeps every key through a thread pool;
at a generous limit or with many clients that is most of the edge's CPU. Here a moving
window is a deque of timestamps, appended on the right and expired from the left, and
idle keys are dropped by one inline sweep every `SWEEP_INTERVAL` seconds. There is one
event loop per process and no `await` inside an operation, so no locks are needed.
"""

from __future__ import annotations

import time
from collections import deque
from math import floor

from limits.aio.storage import MovingWindowSupport, SlidingWindowCounterSupport, Storage
from limits.storage.base import TimestampedSlidingWindow

SWEEP_INTERVAL = 5.0


class MemoryCounters(Storage, MovingWindowSupport, SlidingWindowCounterSupport, TimestampedSlidingWindow):
    STORAGE_SCHEME = None  # built directly, never from a URI

    def __init__(self) -> None:
        super().__init__(None)
        self.counters: dict[str, tuple[int, float]] = {}  # key -> (count, expires at)
        self.windows: dict[str, deque[float]] = {}  # key -> hit times, oldest first
        self.window_ends: dict[str, float] = {}  # key -> when its newest hit expires
        self.next_sweep = time.time() + SWEEP_INTERVAL

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ValueError

    # -- fixed windows (and the two windows of the sliding-window counter) ------------

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = self._now()
        count, expires = self.counters.get(key, (0, 0.0))
        if expires <= now:
            count, expires = 0, now + expiry
        count += amount
        self.counters[key] = (count, expires)
        return count

    async def get(self, key: str) -> int:
        count, expires = self.counters.get(key, (0, 0.0))
        return count if expires > time.time() else 0

    async def get_expiry(self, key: str) -> float:
        now = time.time()
        _, expires = self.counters.get(key, (0, now))
        return max(expires, now)

    async def check(self) -> bool:
        return True

    async def reset(self) -> int | None:
        cleared = len(self.counters) + len(self.windows)
        self.counters.clear()
        self.windows.clear()
        self.window_ends.clear()
        return cleared

    async def clear(self, key: str) -> None:
        self.counters.pop(key, None)
        self.windows.pop(key, None)
        self.window_ends.pop(key, None)

    # -- moving window ----------------------------------------------------------------------

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        now = self._now()
        window = self._window(key, now - expiry)
        if len(window) + amount > limit:
            return False
        window.extend([now] * amount)
        self.window_ends[key] = now + expiry
        return True

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        now = time.time()
        window = self._window(key, now - expiry)
        return (window[0], len(window)) if window else (now, 0)

    def _window(self, key: str, cutoff: float) -> deque[float]:
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = deque()
        while window and window[0] <= cutoff:
            window.popleft()
        return window

    # -- sliding-window counter (the same arithmetic as limits' memory storage) ---------------

    async def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        previous, previous_ttl, current, _ = await self.get_sliding_window(key, expiry)
        if floor(previous * previous_ttl / expiry + current) + amount > limit:
            return False
        _, current_key = self.sliding_window_keys(key, expiry, time.time())
        await self.incr(current_key, 2 * expiry, amount)
        return True

    async def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        now = time.time()
        previous_key, current_key = self.sliding_window_keys(key, expiry, now)
        previous = await self.get(previous_key)
        current = await self.get(current_key)
        previous_ttl = 0.0 if previous == 0 else (1 - (((now - expiry) / expiry) % 1)) * expiry
        current_ttl = (1 - ((now / expiry) % 1)) * expiry + expiry
        return previous, previous_ttl, current, current_ttl

    async def clear_sliding_window(self, key: str, expiry: int) -> None:
        for window_key in self.sliding_window_keys(key, expiry, time.time()):
            await self.clear(window_key)

    # -- expiry -------------------------------------------------------------------------------

    def _now(self) -> float:
        now = time.time()
        if now >= self.next_sweep:
            self.next_sweep = now + SWEEP_INTERVAL
            for key in [key for key, (_, expires) in self.counters.items() if expires <= now]:
                del self.counters[key]
            for key in [key for key, end in self.window_ends.items() if end <= now]:
                del self.window_ends[key]
                self.windows.pop(key, None)
        return now
