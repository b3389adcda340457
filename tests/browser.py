"""Debian's Chromium driven by Playwright, for the tests of what people open in a browser
(the voice page, the API's documentation): launched as people's browsers behave, pages
that fail their test on any page error or CSP violation, and axe-core's verdict."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Playwright

CHROMIUM = Path("/usr/bin/chromium")
# axe-core as the pinned axe-playwright-python ships it (its Python API is not used).
AXE_SPEC = importlib.util.find_spec("axe_playwright_python")
assert AXE_SPEC is not None
assert AXE_SPEC.origin is not None
AXE_SOURCE = (Path(AXE_SPEC.origin).parent / "axe.min.js").read_text()
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--autoplay-policy=user-gesture-required",
]

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium (make test-tools installs it as root)"
)


def launch(playwright: Playwright, *flags: str) -> Browser:
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM),
        headless=True,
        args=[*FLAGS, *flags],
        # Playwright lets pages play sound without a gesture; people's browsers do not.
        ignore_default_args=["--autoplay-policy=no-user-gesture-required"],
    )


@contextlib.contextmanager
def opened_page(browser: Browser, url: str, permissions: list[str] | None = None) -> Iterator[Page]:
    """A fresh context's page at `url`, failing the test on any page error or CSP violation."""
    context = browser.new_context(permissions=["microphone"] if permissions is None else permissions)
    problems: list[str] = []
    page = context.new_page()
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "console",
        lambda message: (
            problems.append(message.text)
            if message.type == "error" and "Content Security Policy" in message.text
            else None
        ),
    )
    page.goto(url)
    try:
        yield page
    finally:
        context.close()
    assert not problems, problems


def axe_violations(page: Page) -> list[dict[str, object]]:
    """axe-core's serious and critical violations on the page as it is now. Run through
    the DevTools protocol, which the page's CSP does not govern."""
    page.evaluate(AXE_SOURCE)
    found = page.evaluate("async () => (await axe.run(document)).violations")
    return [
        {"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]]}
        for v in found
        if v["impact"] in ("serious", "critical")
    ]


def assert_accessible(page: Page) -> None:
    violations = axe_violations(page)
    assert not violations, violations
