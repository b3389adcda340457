"""The edge concerns: each one pure ASGI middleware, in the order `edge.app` declares."""
