"""The API's interactive documentation at `/api/v1/docs`, when published (docs/app.md#feature-flags).

Swagger UI from the files the pinned fastapi-offline (1.7.7) ships as package data, never
from a CDN, and set up by a script of our own (`docs_static/`): the edge's CSP for HTML
runs no inline script. The files are served like the voice page's, under content-hashed
names at `/assets/` (app/page/assets.py), which the edge caches as immutable.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.page.assets import Page, build_page, files_in
from app.page.routes import html

DOCS_URL = "/api/v1/docs"
OPENAPI_URL = "/api/v1/openapi.json"
# What the page uses of fastapi-offline's `static/` (its ReDoc is not published).
SWAGGER_UI = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")

router = APIRouter(include_in_schema=False)


def build_docs() -> Page:
    swagger_ui = files("fastapi_offline").joinpath("static")
    sources = files_in(Path(__file__).parent / "docs_static")
    sources |= {name: swagger_ui.joinpath(name).read_bytes() for name in SWAGGER_UI}
    return build_page({"openapi_url": OPENAPI_URL}, sources)


@router.get(DOCS_URL)
async def docs(request: Request) -> Response:
    page: Page = request.app.state.docs
    return html(page.index, request)
