"""The benchmark's upstream: as cheap as a Python server can be, so the proxy is what is measured.

A raw `asyncio.Protocol` on uvloop, with httptools' C parser, keep-alive and no framework:

- every request gets a fixed `200 ok` (2 bytes, `Content-Length` framed);
- `GET /big` streams `--big-bytes` (1 GiB by default) from one pre-built chunk, written only
  while the transport accepts more (`pause_writing`/`resume_writing`), so nothing piles up;
- `POST /upload` (or `PUT`) counts the request body as it arrives, keeps none of it, and
  answers with the count as the body.

Run: `python bench/tiny_upstream.py --port 9001`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import cast

import httptools
import uvloop

OK_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"
OK_CLOSE_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
BIG_CHUNK = b"x" * (256 * 1024)
DEFAULT_BIG_BYTES = 1024**3


class TinyHttp(asyncio.Protocol):
    """One client connection; requests are answered in order, one at a time."""

    __slots__ = (
        "_big_bytes",
        "_big_left",
        "_keep_alive",
        "_parser",
        "_paused",
        "_received",
        "_transport",
        "_url",
    )

    def __init__(self, big_bytes: int) -> None:
        self._big_bytes = big_bytes
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._received = 0
        self._big_left = 0
        self._paused = False
        self._keep_alive = True

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._close()
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._big_left = 0

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._big_left:
            self._stream_big()

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._received = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._received += len(body)  # counted, never kept

    def on_message_complete(self) -> None:
        transport = self._transport
        if transport is None:
            return
        self._keep_alive = bool(self._parser.should_keep_alive())
        path = self._url.partition(b"?")[0]
        if path == b"/big":
            head = b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: %d\r\n\r\n"
            transport.write(head % self._big_bytes)
            self._big_left = self._big_bytes
            # Further pipelined requests wait until the stream is over.
            transport.pause_reading()
            self._stream_big()
            return
        if path == b"/upload":
            body = b"%d" % self._received
            transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)
            )
        else:
            transport.write(OK_RESPONSE if self._keep_alive else OK_CLOSE_RESPONSE)
        if not self._keep_alive:
            self._close()

    # -- helpers -----------------------------------------------------------------------------

    def _stream_big(self) -> None:
        transport = self._transport
        if transport is None:
            return
        chunk_size = len(BIG_CHUNK)
        while self._big_left and not self._paused:
            if self._big_left >= chunk_size:
                transport.write(BIG_CHUNK)
                self._big_left -= chunk_size
            else:
                transport.write(BIG_CHUNK[: self._big_left])
                self._big_left = 0
        if not self._big_left:
            if self._keep_alive:
                transport.resume_reading()
            else:
                self._close()

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def serve(host: str, port: int, big_bytes: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: TinyHttp(big_bytes), host, port, backlog=2048, reuse_address=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--big-bytes", type=int, default=DEFAULT_BIG_BYTES, help="size of GET /big")
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.big_bytes))


if __name__ == "__main__":
    main()
