"""Helpers for the rate-limit tests: structured-field parsing, log capture, a store that
never answers, isolated keys in the real Redis, and `python -m edge` as a real process.

Nothing here stands in for an edge component: the edge under test is always the real one,
its store is the real Redis on 127.0.0.1:6379 (each test under a key prefix of its own,
deleted afterwards) or a real TCP server on loopback that misbehaves on purpose.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import redis

from tests.servers import free_socket

PROJECT_ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/0"

SfParams = dict[str, int | str | bool]
SfList = list[tuple[str, SfParams]]


# -- RFC 8941 structured fields (the subset the RateLimit fields use) -------------------------------


class StructuredFieldError(ValueError):
    pass


def parse_sf_list(text: str) -> SfList:
    """An RFC 8941 List whose members are Strings or Tokens with parameters.

    `"default-1m";r=2;t=60, "daily";r=9;t=3600` -> [("default-1m", {"r": 2, "t": 60}), ...].
    Anything outside that grammar raises, so a malformed field fails the test that reads it.
    """
    position = 0
    members: SfList = []

    def skip_spaces() -> None:
        nonlocal position
        while position < len(text) and text[position] in " \t":
            position += 1

    def bare_item() -> int | str | bool:
        nonlocal position
        if position >= len(text):
            raise StructuredFieldError(f"item expected at the end of {text!r}")
        char = text[position]
        if char == '"':
            position += 1
            value = []
            while position < len(text):
                char = text[position]
                position += 1
                if char == "\\":
                    if position >= len(text) or text[position] not in '"\\':
                        raise StructuredFieldError(f"bad escape in {text!r}")
                    value.append(text[position])
                    position += 1
                elif char == '"':
                    return "".join(value)
                elif not (0x20 <= ord(char) <= 0x7E):
                    raise StructuredFieldError(f"bad character in a string of {text!r}")
                else:
                    value.append(char)
            raise StructuredFieldError(f"unterminated string in {text!r}")
        if char == "-" or char.isdigit():
            start = position
            position += 1
            while position < len(text) and text[position].isdigit():
                position += 1
            if position < len(text) and text[position] == ".":
                raise StructuredFieldError(f"decimals are not expected in {text!r}")
            digits = text[start:position]
            if digits == "-" or len(digits.lstrip("-")) > 15:
                raise StructuredFieldError(f"bad integer in {text!r}")
            return int(digits)
        if char == "?":
            if text[position : position + 2] not in ("?0", "?1"):
                raise StructuredFieldError(f"bad boolean in {text!r}")
            position += 2
            return text[position - 1] == "1"
        if char.isalpha() or char == "*":
            start = position
            while position < len(text) and (text[position].isalnum() or text[position] in "!#$%&'*+-.^_`|~:/"):
                position += 1
            return text[start:position]
        raise StructuredFieldError(f"unexpected {char!r} in {text!r}")

    def key() -> str:
        nonlocal position
        start = position
        if position >= len(text) or not (text[position].islower() or text[position] == "*"):
            raise StructuredFieldError(f"parameter key expected in {text!r}")
        while position < len(text) and (
            text[position].islower() or text[position].isdigit() or text[position] in "_-.*"
        ):
            position += 1
        return text[start:position]

    skip_spaces()
    if position == len(text):
        return members
    while True:
        item = bare_item()
        if not isinstance(item, str):
            raise StructuredFieldError(f"member names are strings or tokens in {text!r}")
        params: SfParams = {}
        while position < len(text) and text[position] == ";":
            position += 1
            skip_spaces()
            name = key()
            if name in params:
                raise StructuredFieldError(f"parameter {name!r} twice in {text!r}")
            if position < len(text) and text[position] == "=":
                position += 1
                params[name] = bare_item()
            else:
                params[name] = True
        members.append((item, params))
        skip_spaces()
        if position == len(text):
            return members
        if text[position] != ",":
            raise StructuredFieldError(f"',' expected at {position} in {text!r}")
        position += 1
        skip_spaces()
        if position == len(text):
            raise StructuredFieldError(f"trailing comma in {text!r}")


def field_list(response: httpx.Response, name: str) -> SfList:
    """One structured field of a response, which must be present exactly once."""
    values = response.headers.get_list(name)
    assert len(values) == 1, f"{name}: expected one field, got {values!r}"
    return parse_sf_list(values[0])


def integer(params: SfParams, name: str) -> int:
    value = params[name]
    assert isinstance(value, int), params
    assert not isinstance(value, bool), params
    return value


def remaining_and_reset(response: httpx.Response) -> dict[str, tuple[int, int]]:
    """`RateLimit` as {quota name: (r, t)}, each member having exactly `r` and `t`."""
    result: dict[str, tuple[int, int]] = {}
    for name, params in field_list(response, "ratelimit"):
        assert set(params) == {"r", "t"}, params
        remaining, reset = integer(params, "r"), integer(params, "t")
        assert name not in result, f"quota {name!r} listed twice"
        result[name] = (remaining, reset)
    return result


def quotas(response: httpx.Response) -> list[tuple[str, int, int]]:
    """`RateLimit-Policy` as [(quota name, q, w)], in field order."""
    result = []
    for name, params in field_list(response, "ratelimit-policy"):
        assert set(params) == {"q", "w"}, params
        quota, window = integer(params, "q"), integer(params, "w")
        result.append((name, quota, window))
    return result


def has_no_rate_limit_fields(response: httpx.Response) -> bool:
    names = ("ratelimit", "ratelimit-policy", "retry-after", "x-ratelimit-limit")
    return not any(name in response.headers for name in names)


# -- logs -------------------------------------------------------------------------------------------


class RecordCollector(logging.Handler):
    """Collects the records of one logger, from whatever thread wrote them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._lock_records = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_records:
            self.records.append(record)

    def snapshot(self) -> list[logging.LogRecord]:
        with self._lock_records:
            return list(self.records)


@contextlib.contextmanager
def collect_records(logger_name: str) -> Iterator[RecordCollector]:
    """Attached to the logger itself, not the root: starting an edge (uvicorn's dictConfig)
    replaces the root's handlers, which is where pytest's caplog listens. Attach it after
    the edge has started."""
    collector = RecordCollector()
    logger = logging.getLogger(logger_name)
    logger.addHandler(collector)
    try:
        yield collector
    finally:
        logger.removeHandler(collector)


# -- a store that accepts connections and never answers -----------------------------------------------


class SilentServer:
    """A TCP server on loopback, in a thread of its own: it accepts every connection, reads
    and discards what arrives, and never writes a byte - a Redis that hangs."""

    def __init__(self) -> None:
        self.sock = free_socket()
        self.port: int = self.sock.getsockname()[1]
        self.sock.listen(128)
        self.sock.settimeout(0.05)
        self.accepted = 0
        self.bytes_received = 0
        self._connections: list[socket.socket] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> SilentServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        for connection in self._connections:
            connection.close()
        self.sock.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self.sock.accept()
            except TimeoutError:
                connection = None
            if connection is not None:
                connection.setblocking(False)
                self._connections.append(connection)
                self.accepted += 1
            for open_connection in self._connections:
                with contextlib.suppress(BlockingIOError, OSError):
                    self.bytes_received += len(open_connection.recv(65536))


@contextlib.contextmanager
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer().start()
    try:
        yield server
    finally:
        server.stop()


# -- the real Redis, one key prefix per test ----------------------------------------------------------


def unique_prefix() -> str:
    return f"edgetest-{uuid.uuid4().hex}"


@contextlib.contextmanager
def isolated_redis_keys() -> Iterator[tuple[str, redis.Redis]]:
    """A fresh key prefix, and a client to look at its keys; every key under the prefix is
    deleted afterwards (never FLUSHDB: the Redis may be shared)."""
    prefix = unique_prefix()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        yield prefix, client
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def keys_under(client: redis.Redis, prefix: str) -> list[str]:
    return sorted(key.decode() for key in client.scan_iter(match=f"{prefix}:*", count=1000))
