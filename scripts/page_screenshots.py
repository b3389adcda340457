"""Screenshots of the voice page for docs/page.md: desktop and phone widths, idle and
mid-conversation, from a running stack (`make run`) in Debian's Chromium.

    .venv/bin/python scripts/page_screenshots.py [http://127.0.0.1:8080] [docs/page]
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import ViewportSize, expect, sync_playwright

SIZES = {"desktop": ViewportSize(width=1280, height=800), "phone": ViewportSize(width=390, height=844)}
SAID = ["Hello! I love hiking in the mountains.", "What do you remember about me?"]


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/page")
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"]
        )
        for name, size in SIZES.items():
            context = browser.new_context(viewport=size, device_scale_factor=1)
            page = context.new_page()
            page.goto(url)
            expect(page.get_by_role("status")).to_have_text("Ready")
            page.screenshot(path=out / f"{name}-idle.png")
            for number, text in enumerate(SAID, start=1):
                page.get_by_label("Message").fill(text)
                page.get_by_role("button", name="Send").click()
                expect(page.locator(".message.companion")).to_have_count(number, timeout=30000)
            page.get_by_role("status").click()  # no focus ring on the last button pressed
            page.screenshot(path=out / f"{name}-conversation.png", full_page=True)
            context.close()
        browser.close()


if __name__ == "__main__":
    main()
