"""Redis for the Redis-store edge: whether it answers, its CPU time, the run's keys deleted at the end."""

from __future__ import annotations

import os
import secrets
import sys

import redis

from bench.support import log


class RedisStore:
    """The Redis the Redis-store edge counts in, under a key prefix of this run only."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"edge-bench-{os.getpid()}-{secrets.token_hex(4)}"
        self.client = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)

    def ping(self) -> str | None:
        """None when Redis answers, else why not."""
        try:
            self.client.ping()
        except redis.RedisError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def cpu_seconds(self) -> float:
        """The Redis server's user + system CPU (every client's work, not only the edge's)."""
        info = self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def delete_keys(self) -> int:
        """SCAN + DEL of this run's prefix only (never FLUSHDB: the Redis is shared)."""
        deleted = 0
        batch: list[bytes] = []
        for key in self.client.scan_iter(match=f"{self.prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += int(self.client.delete(*batch))
                batch.clear()
        if batch:
            deleted += int(self.client.delete(*batch))
        return deleted

    def clean_up(self) -> None:
        """The end of the run, once the edges have stopped: its keys deleted, the client closed."""
        try:
            deleted = self.delete_keys()
            log(f"Redis: deleted {deleted} keys under {self.prefix}:")
        except redis.RedisError as exc:
            print(f"proxy_bench: could not delete the Redis keys {self.prefix}:* ({exc})", file=sys.stderr)
        self.close()

    def close(self) -> None:
        self.client.close()
