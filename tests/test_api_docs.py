"""The API's interactive documentation through the edge of a stack started like `make run`
(development: published): Swagger UI from the app's own files under the edge's CSP for
pages, in Debian's Chromium (docs/app.md#the-api-apiv1). Swagger UI's own markup is not held to
axe-core's rules as the voice page is (docs/app.md says what it fails)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Page, Request, expect, sync_playwright

from tests.browser import launch, needs_chromium, opened_page
from tests.test_run_stack import Stack, started_stack

DOCS = "/api/v1/docs"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with started_stack(tmp_path_factory.mktemp("docs-stack")) as running:
        yield running


def test_the_viewer_and_its_files_come_from_the_app_and_are_cached_as_they_should_be(stack: Stack) -> None:
    with httpx.Client(base_url=stack.edge_url, timeout=5) as client:
        viewer = client.get(DOCS)
        assert viewer.status_code == 200, viewer.text
        assert viewer.headers["content-type"].startswith("text/html")
        assert viewer.headers["cache-control"] == "no-store"  # under the API's prefix
        policy = viewer.headers["content-security-policy"]
        assert "script-src 'self';" in policy
        assert "'unsafe-inline'" not in policy
        assert "'unsafe-eval'" not in policy
        for inline in ("<script>", "<style", " style="):
            assert inline not in viewer.text
        assert not re.search(r"(?:src|href)=\"(?:https?:)?//", viewer.text), "a file from another origin"
        files = re.findall(r'(?:src|href)="(/assets/[^"]+)"', viewer.text)
        assert len(files) == 4, files  # icon, stylesheet, Swagger UI, its set-up
        for path in files:
            served = client.get(path, headers={"accept-encoding": "gzip"})
            assert served.status_code == 200, path
            assert served.headers["cache-control"] == "public, max-age=31536000, immutable", path
        bundle = next(path for path in files if "/swagger-ui-bundle." in path)
        assert client.get(bundle, headers={"accept-encoding": "gzip"}).headers["content-encoding"] == "gzip"
        revalidated = client.get(DOCS, headers={"if-none-match": viewer.headers["etag"]})
        assert revalidated.status_code == 304


@needs_chromium
def test_the_viewer_renders_every_operation_and_tries_one_through_the_edge(stack: Stack) -> None:
    operations = [
        (method.upper(), path)
        for path, item in httpx.get(f"{stack.edge_url}/api/v1/openapi.json", timeout=5).json()["paths"].items()
        for method in item
    ]
    assert len(operations) >= 5, operations
    origins: set[str] = set()

    def seen(request: Request) -> None:
        parts = urlsplit(request.url)
        origins.add(f"{parts.scheme}://{parts.netloc}")

    with sync_playwright() as playwright:
        browser = launch(playwright)
        with opened_page(browser, stack.edge_url + DOCS, permissions=[]) as page:
            page.on("request", seen)
            page.reload()
            expect(page.get_by_role("heading", name=re.compile("Voice companion"))).to_be_visible()
            expect(page.locator(".opblock")).to_have_count(len(operations))
            for method, path in operations:
                expect(page.locator(f'.opblock-summary-path[data-path="{path}"]').first).to_be_visible()
                assert method in page.locator(".opblock-summary-method").all_inner_texts()
            try_health(page)
        browser.close()
    assert origins == {stack.edge_url}, origins


def try_health(page: Page) -> None:
    """Swagger UI's "Try it out" on the liveness probe: a real call from the page."""
    health = page.locator(".opblock", has=page.locator('[data-path="/api/v1/health"]'))
    health.locator(".opblock-summary").click()
    health.get_by_role("button", name="Try it out").click()
    health.get_by_role("button", name="Execute").click()
    expect(health.locator(".live-responses-table .response .response-col_status")).to_have_text("200")
