"""The edge's HTTP server: uvicorn runs it, with the edge's own HTTP/1.1 protocol.

`serve.py` starts one process or several workers; `protocol.py` reads each client's bytes
(strict framing, timeouts, per-client caps); `request_head.py` judges each request head;
`config.py` carries the limits into every worker; `websocket.py` takes over WebSocket
handshakes. See docs/proxy.md.
"""
