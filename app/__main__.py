"""A small demo upstream so the edge is usable before the real app exists.

`GET /` says hello, `/echo` returns what it received, `/events` streams server-sent
events, `/ws` echoes WebSocket messages. Served on APP_HOST:APP_PORT (127.0.0.1:8000).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import uvicorn
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


class DemoSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APP_")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"message": "Hello from the demo upstream behind the edge."})


async def echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse(
        {
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "headers": [
                [name.decode("latin-1"), value.decode("latin-1")] for name, value in request.headers.raw
            ],
            "body_bytes": len(body),
        }
    )


async def events(request: Request) -> StreamingResponse:
    async def ticks() -> AsyncIterator[bytes]:
        for number in range(5):
            yield f"id: {number}\ndata: tick {number}\n\n".encode()
            await asyncio.sleep(1)

    return StreamingResponse(ticks(), media_type="text/event-stream")


async def websocket_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass


app = Starlette(
    routes=[
        Route("/", hello),
        Route("/echo", echo, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        Route("/events", events),
        WebSocketRoute("/ws", websocket_echo),
    ]
)


if __name__ == "__main__":
    settings = DemoSettings()
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
