"""Cache policy: a `Cache-Control` for responses whose upstream set none.

The first that applies: an error (4xx, 5xx) gets `no-store`, whatever a policy rule says;
a redirect (3xx but 304) gets nothing; then a policy rule's `cache`, `no-store` under
`EDGE_API_PATH_PREFIXES`, `public, max-age=31536000, immutable` for fingerprinted assets,
`no-cache` for HTML pages; anything else gets nothing. An upstream's own `Cache-Control`
always wins. The order and why: docs/edge.md#cache-policy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge.policy import RouteTable

IMMUTABLE = b"public, max-age=31536000, immutable"
REVALIDATE = b"no-cache"
NO_STORE = b"no-store"
NAMED = {"immutable": IMMUTABLE, "revalidate": REVALIDATE, "no-store": NO_STORE}

# A hash right before a static file's extension: 8+ letters and digits, with at least one of
# each, after a `.` or `-`. Anything looser pins files such as `logo-2024-dark.png` or
# `plugin-v2.js` for a year; hashes this misses just get no caching header.
FINGERPRINTED = re.compile(
    r"[.-](?=[A-Za-z]*[0-9])(?=[0-9]*[A-Za-z])[A-Za-z0-9]{8,}"
    r"\.(?:js|mjs|css|map|woff2?|ttf|otf|eot|png|jpe?g|gif|svg|webp|avif|ico|wasm|mp3|ogg|wav|webm|mp4)$"
)


def cache_control_value(setting: str) -> bytes:
    return NAMED.get(setting, setting.encode("latin-1"))


class CachePolicyMiddleware:
    def __init__(self, app: ASGIApp, rules: RouteTable[bytes | None], api_prefixes: Sequence[str]) -> None:
        self.app = app
        self.rules = rules
        self.api_prefixes = tuple(api_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        path = scope["path"]
        by_path = self.rules.lookup(scope["method"], path)
        if by_path is None:
            if path.startswith(self.api_prefixes):
                by_path = NO_STORE
            elif FINGERPRINTED.search(path):
                by_path = IMMUTABLE

        async def send_with_cache_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", ())
                status = message["status"]
                if not any(name == b"cache-control" for name, _ in headers) and not _is_redirect(status):
                    value = NO_STORE if status >= 400 else by_path
                    if value is None and any(
                        name == b"content-type" and content_type.startswith(b"text/html")
                        for name, content_type in headers
                    ):
                        value = REVALIDATE
                    if value is not None:
                        message["headers"] = [*headers, (b"cache-control", value)]
            await send(message)

        await self.app(scope, receive, send_with_cache_policy)


def _is_redirect(status: int) -> bool:
    # A redirect is left alone: a temporary one pinned for a year would outlive its target
    # (a signed storage URL, say), and permanent ones are cacheable by definition.
    return 300 <= status < 400 and status != 304
