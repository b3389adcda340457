"""The page's routes: `/` (the HTML) and `/assets/{name}` (hashed files), outside the API
document. The app sets no `Cache-Control` here: the edge's cache policy gives hashed names
`immutable` and HTML `no-cache` (docs/edge.md#cache-policy). The HTML has an `ETag`, so
that a revalidation costs a 304; both answer gzip to a client that accepts it."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from app.page.assets import File, Page

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index(request: Request) -> Response:
    page: Page = request.app.state.page
    return html(page.index, request)


@router.get("/assets/{name}")
async def asset(name: str, request: Request) -> Response:
    # The voice page's and, when published, the API documentation's (app/api/docs.py).
    assets: Mapping[str, File] = request.app.state.assets
    found = assets.get(name)
    if found is None:
        raise HTTPException(404)
    return _served(found, request)


def html(file: File, request: Request) -> Response:
    """A page's HTML, or a 304 when the client holds this version."""
    if file.etag in _etags(request.headers.get("if-none-match", "")):
        return Response(status_code=304, headers={"etag": file.etag, "vary": "accept-encoding"})
    return _served(file, request)


def _served(file: File, request: Request) -> Response:
    headers = {"etag": file.etag, "vary": "accept-encoding"}
    if file.gzipped is not None and _accepts_gzip(request.headers.get("accept-encoding", "")):
        headers["content-encoding"] = "gzip"
        return Response(file.gzipped, media_type=file.content_type, headers=headers)
    return Response(file.content, media_type=file.content_type, headers=headers)


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",")}


def _accepts_gzip(header: str) -> bool:
    for coding in header.lower().split(","):
        name, _, params = coding.strip().partition(";")
        if name.strip() in ("gzip", "*"):
            q = params.strip().removeprefix("q=").strip()
            return q == "" or _quality(q) > 0
    return False


def _quality(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return 0.0
