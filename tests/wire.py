"""A raw HTTP/1.1 client for the tests: exact bytes out, responses parsed from exactly what
came back (Content-Length, chunked or close-delimited), so nothing a library normalises
hides what the edge sent."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from typing import Any, Self


@dataclass
class WireResponse:
    """One response as it came off the wire: the head exactly as sent, header names as they
    came, and the body as its framing delimits it - or, read `unframed`, every byte after
    the head, for a response cut short or followed by another."""

    status: int
    head: bytes
    headers: list[tuple[bytes, bytes]]  # names exactly as they came off the wire
    body: bytes

    @classmethod
    def unframed(cls, data: bytes) -> WireResponse:
        """The first head in `data`, with everything after it as the body."""
        head, separator, body = data.partition(b"\r\n\r\n")
        assert separator, f"no complete response head: {data[:200]!r}"
        return _with_head(head, body)

    @property
    def status_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    def values(self, name: str) -> list[bytes]:
        wanted = name.encode("ascii").lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    def json(self) -> Any:
        return json.loads(self.body)


def _with_head(head: bytes, body: bytes) -> WireResponse:
    status_line, *lines = head.split(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 "), f"not a status line: {status_line[:200]!r}"
    headers = []
    for line in lines:
        name, colon, value = line.partition(b":")
        assert colon, f"not a header line: {line!r}"
        headers.append((name, value.strip()))
    return WireResponse(int(status_line.split(b" ")[1]), head, headers, body)


class WireClient:
    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        self.buffer = b""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError(f"connection closed; unparsed bytes: {self.buffer[:200]!r}")
        self.buffer += data

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            self._fill()
        data, _, self.buffer = self.buffer.partition(marker)
        return data

    def _read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def _read_to_close(self) -> bytes:
        while True:
            try:
                self._fill()
            except EOFError:
                break
        data, self.buffer = self.buffer, b""
        return data

    def read_response(self, *, head_request: bool = False) -> WireResponse:
        response = _with_head(self._read_until(b"\r\n\r\n"), b"")
        status = response.status
        if head_request or status in (204, 304) or 100 <= status < 200:
            return response
        if b"chunked" in b",".join(response.values("transfer-encoding")).lower():
            parts = []
            while True:
                size = int(self._read_until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    while self._read_until(b"\r\n"):
                        pass  # trailer fields, up to the empty line
                    break
                parts.append(self._read_exactly(size))
                assert self._read_exactly(2) == b"\r\n"
            response.body = b"".join(parts)
        elif response.values("content-length"):
            response.body = self._read_exactly(int(response.values("content-length")[0]))
        else:
            response.body = self._read_to_close()
        return response

    def unexpected_bytes(self, wait: float = 0.3) -> bytes:
        """Whatever arrives within `wait` seconds when nothing is owed."""
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            data = b""
        finally:
            self.sock.settimeout(self.timeout)
        return self.buffer + data

    def closed_by_peer(self, wait: float = 2.0) -> bool:
        """True if the peer closes the connection (FIN or RST) within `wait` seconds with
        nothing more to say."""
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(self.timeout)
        self.buffer += data
        return not data


@dataclass
class RawExchange:
    """Whatever came back on a raw socket until the edge closed it (or the wait ran out)."""

    data: bytes
    closed: bool  # the edge ended the connection (FIN or RST)
    elapsed: float

    @property
    def response(self) -> WireResponse:
        """The first response, unframed: everything after its head is its body."""
        assert self.data, "the edge answered nothing"
        return WireResponse.unframed(self.data)


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Everything the peer sends until it closes the connection (FIN or RST) or `timeout`
    seconds have passed; and whether it closed."""
    received = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return bytes(received), False
        except ConnectionResetError:
            return bytes(received), True
        if not chunk:
            return bytes(received), True
        received += chunk
    return bytes(received), False


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> RawExchange:
    """Sends `data` in one write and reads until the edge closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        started = time.monotonic()
        sock.sendall(data)
        received, closed = read_until_closed(sock, timeout)
        return RawExchange(received, closed, time.monotonic() - started)
