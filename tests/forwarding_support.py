"""An upstream for the forwarding tests that proves streaming without relying on sleeps.

`GateUpstream` synchronises with the test through thread-safe events, so a test can tell
"the edge passed this part on before the rest existed" from "the edge buffered it":

- any path but `/trickle` reads the request body; the moment its first bytes arrive it
  sets `first_body_chunk` (the client's generator waits for that event before it produces
  the rest of the body), then answers with the body's length and sha256 as JSON;
- `/trickle` sends `first\\n`, waits until the test sets `release` (the client sets it once
  it has received the first part; at most `RELEASE_TIMEOUT`), then sends `second\\n`.
  `?length=1` frames the response with `Content-Length`, otherwise it is chunked.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading

from starlette.types import Receive, Scope, Send

from tests.servers import ServerThread, serve

RELEASE_TIMEOUT = 4.0
TRICKLE_FIRST = b"first\n"
TRICKLE_SECOND = b"second\n"


class GateUpstream:
    def __init__(self) -> None:
        self.first_body_chunk = threading.Event()
        self.release = threading.Event()

    def reset(self) -> None:
        self.first_body_chunk.clear()
        self.release.clear()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        if scope["path"] == "/trickle":
            await self.trickle(scope, send)
            return
        digest = hashlib.sha256()
        length = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            if chunk:
                self.first_body_chunk.set()
            digest.update(chunk)
            length += len(chunk)
            if not message.get("more_body"):
                break
        body = json.dumps({"body_length": length, "body_sha256": digest.hexdigest()}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def trickle(self, scope: Scope, send: Send) -> None:
        headers = [(b"content-type", b"application/octet-stream")]
        if scope["query_string"] == b"length=1":
            headers.append((b"content-length", b"%d" % len(TRICKLE_FIRST + TRICKLE_SECOND)))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": TRICKLE_FIRST, "more_body": True})
        await asyncio.to_thread(self.release.wait, RELEASE_TIMEOUT)
        await send({"type": "http.response.body", "body": TRICKLE_SECOND})


def start_gate_upstream() -> tuple[ServerThread, GateUpstream]:
    app = GateUpstream()
    return serve(app), app
