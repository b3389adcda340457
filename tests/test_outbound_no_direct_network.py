"""Nothing in the app reaches the network except through `app/outbound/`.

Every module of `app/` outside `app/outbound/` is parsed and checked for the ways Python
code opens connections by itself: constructing httpx clients or transports (or httpx's
one-shot `httpx.get(...)` helpers, which build a client), importing `requests`,
`urllib.request`, `urllib3`, `aiohttp`, `http.client`, `httpcore` or `socket`, asyncio's
own connections, WebSocket clients, and provider SDK clients built without the shared
transport. Names are followed through `import ... as` and `from ... import`.
"""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app"
ALLOWED = APP / "outbound"

FORBIDDEN_MODULES = ("socket", "requests", "urllib.request", "urllib3", "aiohttp", "http.client", "httpcore")

FORBIDDEN_CALLS = {
    **{
        f"httpx.{name}": "builds its own httpx connection pool: use Outbound.client"
        for name in ("Client", "AsyncClient", "HTTPTransport", "AsyncHTTPTransport")
    },
    **{
        f"httpx.{name}": "builds a throwaway httpx client: use Outbound.client"
        for name in ("get", "post", "put", "patch", "delete", "head", "options", "request", "stream")
    },
    "asyncio.open_connection": "opens a socket",
    "asyncio.open_unix_connection": "opens a socket",
    "websockets.connect": "opens a WebSocket connection",
    "websockets.client.connect": "opens a WebSocket connection",
    "websockets.asyncio.client.connect": "opens a WebSocket connection",
}

# Event-loop methods that open connections, whatever the loop object is called.
FORBIDDEN_METHODS = ("create_connection", "create_unix_connection", "create_datagram_endpoint", "sock_connect")

# Provider SDK clients: each builds its own httpx client unless handed one (or our transport).
SDK_CLIENTS = (
    "groq.Groq",
    "groq.AsyncGroq",
    "openai.OpenAI",
    "openai.AsyncOpenAI",
    "elevenlabs.ElevenLabs",
    "elevenlabs.AsyncElevenLabs",
    "elevenlabs.client.ElevenLabs",
    "elevenlabs.client.AsyncElevenLabs",
    "qdrant_client.QdrantClient",
    "qdrant_client.AsyncQdrantClient",
)
SDK_TRANSPORT_KEYWORDS = ("http_client", "httpx_client", "transport")


def is_within(module: str, forbidden: str) -> bool:
    return module == forbidden or module.startswith(forbidden + ".")


def dotted_name(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """`a.b.c` with `a` resolved through the module's imports; None for anything else."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def sdk_client_without_transport(call: ast.Call) -> bool:
    keywords = {keyword.arg for keyword in call.keywords}
    if None in keywords or keywords & set(SDK_TRANSPORT_KEYWORDS):  # `**kwargs` may carry them
        return False
    # qdrant-client's embedded modes open no connection.
    if "path" in keywords:
        return False
    locations = [keyword.value for keyword in call.keywords if keyword.arg == "location"] + call.args[:1]
    return not any(isinstance(value, ast.Constant) and value.value == ":memory:" for value in locations)


def violations(source: str, filename: str) -> list[str]:
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:  # `import a.b as c`: c is a.b
                    aliases[alias.asname] = alias.name
                else:  # `import a.b`: a is a
                    top = alias.name.split(".")[0]
                    aliases[top] = top
                found += [
                    f"{filename}:{node.lineno}: imports {alias.name}"
                    for forbidden in FORBIDDEN_MODULES
                    if is_within(alias.name, forbidden)
                ]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                aliases[alias.asname or alias.name] = full
                found += [
                    f"{filename}:{node.lineno}: imports {full}"
                    for forbidden in FORBIDDEN_MODULES
                    if is_within(full, forbidden)
                ]
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted_name(node.func, aliases)
        if name in FORBIDDEN_CALLS:
            found.append(f"{filename}:{node.lineno}: calls {name} ({FORBIDDEN_CALLS[name]})")
        elif name in SDK_CLIENTS and sdk_client_without_transport(node):
            found.append(f"{filename}:{node.lineno}: builds {name} without the shared transport")
        elif isinstance(node.func, ast.Attribute) and node.func.attr in FORBIDDEN_METHODS:
            found.append(f"{filename}:{node.lineno}: calls .{node.func.attr}() (opens a connection)")
    return sorted(set(found), key=lambda line: (int(line.split(":")[1]), line))


def test_nothing_in_the_app_reaches_the_network_but_through_app_outbound() -> None:
    modules = [path for path in APP.rglob("*.py") if ALLOWED not in path.parents]
    assert APP / "__main__.py" in modules  # the scan sees the app's own modules
    found: list[str] = []
    for path in modules:
        found += violations(path.read_text(), str(path.relative_to(APP.parent)))
    assert found == []


def test_the_check_finds_each_way_around_the_shared_transport() -> None:
    source = """
import httpx
import httpx as web
import socket
import urllib.request
from urllib import request
from http import client
import aiohttp, requests
from httpx import AsyncClient as Pool, Request, Response
from asyncio import get_running_loop, open_connection
from qdrant_client import AsyncQdrantClient
import groq
import websockets

web.AsyncClient(base_url="https://api.groq.com")
Pool()
httpx.post("https://api.elevenlabs.io/v1/text-to-speech/v")
httpx.AsyncHTTPTransport(retries=3)
Request("GET", "https://example.org")
Response(200)
open_connection("example.org", 443)
get_running_loop().create_connection(object, "example.org", 443)
AsyncQdrantClient(url="http://qdrant:6333")
AsyncQdrantClient(url="http://qdrant:6333", **outbound.httpx_kwargs("qdrant", "http://qdrant:6333"))
AsyncQdrantClient(":memory:")
AsyncQdrantClient(path="/data/qdrant")
groq.AsyncGroq(api_key="k")
groq.AsyncGroq(api_key="k", http_client=outbound.client("groq", "https://api.groq.com"), max_retries=0)
websockets.connect("wss://api.elevenlabs.io/v1/text-to-speech/v/stream-input")
"""
    assert violations(source, "app/sneaky.py") == [
        "app/sneaky.py:4: imports socket",
        "app/sneaky.py:5: imports urllib.request",
        "app/sneaky.py:6: imports urllib.request",
        "app/sneaky.py:7: imports http.client",
        "app/sneaky.py:8: imports aiohttp",
        "app/sneaky.py:8: imports requests",
        "app/sneaky.py:15: calls httpx.AsyncClient (builds its own httpx connection pool: use Outbound.client)",
        "app/sneaky.py:16: calls httpx.AsyncClient (builds its own httpx connection pool: use Outbound.client)",
        "app/sneaky.py:17: calls httpx.post (builds a throwaway httpx client: use Outbound.client)",
        "app/sneaky.py:18: calls httpx.AsyncHTTPTransport (builds its own httpx connection pool: use Outbound.client)",
        "app/sneaky.py:21: calls asyncio.open_connection (opens a socket)",
        "app/sneaky.py:22: calls .create_connection() (opens a connection)",
        "app/sneaky.py:23: builds qdrant_client.AsyncQdrantClient without the shared transport",
        "app/sneaky.py:27: builds groq.AsyncGroq without the shared transport",
        "app/sneaky.py:29: calls websockets.connect (opens a WebSocket connection)",
    ]
