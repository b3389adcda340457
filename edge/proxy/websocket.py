"""WebSocket upgrades, proxied message by message to the upstream.

The handshake is repeated towards the upstream with the client's headers and offered
subprotocols; the upstream's choice is what the client is accepted with. If the upstream
refuses the upgrade, its status and body are relayed; if it cannot be reached, the client
gets the edge's 502/504 envelope. Text and binary messages and close codes pass both ways.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress

from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import CloseCode

from edge import errors
from edge.proxy.ingress import ForwardedRequest
from edge.proxy.upstream import Origin
from edge.scope import FORWARDED_SCOPE_KEY, WEBSOCKET_DENIAL_EXTENSION, Headers

logger = logging.getLogger("edge.proxy")

# The handshake is made anew towards the upstream; these belong to the client's one.
HANDSHAKE_REQUEST_FIELDS = frozenset(
    {
        b"host",
        b"connection",
        b"upgrade",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"user-agent",
    }
)
HANDSHAKE_RESPONSE_FIELDS = frozenset(
    {
        "connection",
        "upgrade",
        "sec-websocket-accept",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "content-length",
        "date",
        "server",
    }
)

# Codes that must never be sent in a close frame (RFC 6455 section 7.4.1).
NOT_SENDABLE = {CloseCode.NO_STATUS_RCVD, CloseCode.ABNORMAL_CLOSURE, CloseCode.TLS_HANDSHAKE}
BAD_GATEWAY = 1014  # RFC 6455 registry: a gateway got an invalid response upstream


class WebSocketForwarder:
    def __init__(self, origin: Origin, *, connect_timeout: float, max_message_bytes: int) -> None:
        ws_scheme = "wss" if origin.scheme == "https" else "ws"
        self._base_url = f"{ws_scheme}://{origin.authority.decode()}{origin.path_prefix.decode()}"
        self._connect_timeout = connect_timeout
        self._max_message_bytes = max_message_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        try:
            upstream = await self._connect(scope)
        except InvalidStatus as refusal:
            await _deny(scope, send, refusal)
            return
        except TimeoutError:
            await _deny_with_error(scope, send, errors.UPSTREAM_TIMEOUT)
            return
        except (OSError, InvalidHandshake):
            await _deny_with_error(scope, send, errors.UPSTREAM_UNAVAILABLE)
            return

        async with upstream:
            response_headers = (
                [
                    (name.lower().encode("latin-1"), value.encode("latin-1"))
                    for name, value in upstream.response.headers.raw_items()
                    if name.lower() not in HANDSHAKE_RESPONSE_FIELDS
                ]
                if upstream.response is not None
                else []
            )
            await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol, "headers": response_headers})
            to_upstream = asyncio.ensure_future(_client_to_upstream(receive, upstream))
            to_client = asyncio.ensure_future(_upstream_to_client(upstream, send))
            try:
                await asyncio.wait({to_upstream, to_client}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (to_upstream, to_client):
                    task.cancel()
                await asyncio.gather(to_upstream, to_client, return_exceptions=True)

    async def _connect(self, scope: Scope) -> ClientConnection:
        url = self._base_url + scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        forwarded: ForwardedRequest = scope[FORWARDED_SCOPE_KEY]
        headers: Headers = [(name, value) for name, value in scope["headers"] if name not in HANDSHAKE_REQUEST_FIELDS]
        headers += forwarded.upstream_headers()
        user_agent = next((v for n, v in scope["headers"] if n == b"user-agent"), None)
        return await connect(
            url,
            additional_headers=[(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers],
            subprotocols=scope.get("subprotocols") or None,
            user_agent_header=user_agent.decode("latin-1") if user_agent else None,
            compression=None,  # one hop on a private network: spend no CPU on deflate
            open_timeout=self._connect_timeout,
            max_size=self._max_message_bytes,
            proxy=None,  # never route through a proxy found in the environment
        )


async def _client_to_upstream(receive: Receive, upstream: ClientConnection) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.receive":
            text = message.get("text")
            with suppress(ConnectionClosed):
                await upstream.send(text if text is not None else message.get("bytes") or b"")
        elif message["type"] == "websocket.disconnect":
            code = message.get("code", CloseCode.NORMAL_CLOSURE)
            if code in NOT_SENDABLE:
                code = CloseCode.NORMAL_CLOSURE if code == CloseCode.NO_STATUS_RCVD else CloseCode.GOING_AWAY
            await upstream.close(code, message.get("reason") or "")
            return


async def _upstream_to_client(upstream: ClientConnection, send: Send) -> None:
    with suppress(ConnectionClosed):
        async for data in upstream:
            if isinstance(data, str):
                await send({"type": "websocket.send", "text": data})
            else:
                await send({"type": "websocket.send", "bytes": data})
    code = upstream.close_code
    if code is None or code == CloseCode.ABNORMAL_CLOSURE:
        code = BAD_GATEWAY
    elif code in NOT_SENDABLE:
        code = CloseCode.NORMAL_CLOSURE
    with suppress(OSError, RuntimeError):
        await send({"type": "websocket.close", "code": code, "reason": upstream.close_reason or ""})


async def _deny(scope: Scope, send: Send, refusal: InvalidStatus) -> None:
    """Relay the upstream's refusal of the upgrade (401, 403, 404...) as it was."""
    response = refusal.response
    if WEBSOCKET_DENIAL_EXTENSION not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    headers = [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in response.headers.raw_items()
        if name.lower() in ("content-type", "www-authenticate", "set-cookie", "retry-after")
    ]
    await send({"type": "websocket.http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": response.body or b""})


async def _deny_with_error(scope: Scope, send: Send, error: errors.EdgeError) -> None:
    logger.warning("websocket upstream failed: %s", error.code)
    await errors.deny_websocket(scope, send, error)
