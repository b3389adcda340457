"""The project's one error envelope, shared by the edge and the internal app, so a client
handles one format whoever answered:

    {"error": {"code": "...", "message": "...", "request_id": "...", "details": ...}}

`code` is stable and machine-readable, `message` is for people and names nothing internal
(no addresses, library names or stack traces); `details` is optional.
"""

from __future__ import annotations

from typing import Any

import orjson


def envelope(code: str, message: str, request_id: str | None, details: Any = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message, "request_id": request_id}
    if details is not None:
        error["details"] = details
    return orjson.dumps({"error": error})
