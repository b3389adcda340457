"""Every error the API answers, in the project's one envelope, with the request id.

`{"error": {"code", "message", "request_id", "details"?}}` - the edge uses the same one.
Messages are written for the person using the app; nothing internal (addresses, library
names, stack traces) is ever put in them. Unexpected failures are answered by
`app.observability`, which knows the request id.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from common.envelope import envelope
from common.logs import request_id_var

logger = logging.getLogger("app.api")

HTTP_ERRORS = {
    404: ("not_found", "There is nothing at this address."),
    405: ("method_not_allowed", "This method is not allowed here."),
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.details = details


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, details: Any = None
) -> Response:
    body = envelope(code, message, request_id_var.get(), details)
    return Response(
        body,
        status_code=status,
        media_type="application/json",
        headers={"cache-control": "no-store", **(headers or {})},
    )


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers, exc.details)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code, message = HTTP_ERRORS.get(exc.status_code, ("bad_request", "The request cannot be handled."))
    headers = {name: value for name, value in (exc.headers or {}).items() if name.lower() != "allow"}
    if exc.status_code == 405:
        # Starlette names only the methods of the first route on the path; GET and DELETE
        # of one resource are two routes, and `Allow` must list both (RFC 9110 15.5.6).
        headers["allow"] = ", ".join(allowed_methods(request))
    return error_response(exc.status_code, code, message, headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method the API document lists for the requested path, and HEAD with GET
    (`app.api.methods`)."""
    methods: set[str] = set()
    for template, operations in request.app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", template), request.url.path):
            methods |= {method.upper() for method in operations}
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


async def validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    details = [
        {"field": ".".join(str(part) for part in error["loc"][1:]), "problem": error["msg"]} for error in exc.errors()
    ]
    return error_response(422, "invalid_request", "The request does not have the expected shape.", details=details)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
