"""A real browser for tests: Debian's Chromium (``/usr/bin/chromium``, installed by ``make
system-deps``) driven by Playwright's library, which never downloads a browser of its own.

Every page opened through :func:`open_page` records what would show in the browser's console
as an error (a Content-Security-Policy refusal, an uncaught exception): tests assert there is
none. Screenshots go under ``.fmapi/screenshots/`` (not committed) for people to look at.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# Headless, as root in a container: no sandbox, no GPU, nothing fetched in the background.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-dev-shm-usage", "--disable-extensions", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / ".fmapi" / "screenshots"

LAPTOP = {"width": 1366, "height": 860}
PHONE = {"width": 390, "height": 844}


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator:
    """A headless Chromium (Playwright's Browser)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make system-deps` installs Debian's chromium")
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class Tab:
    """A page in its own browser context (its own sessionStorage), and what went wrong in it."""

    context: object
    page: object
    problems: list[str] = field(default_factory=list)
    responses: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path, status)

    def assert_clean(self) -> None:
        assert not self.problems, "the browser reported: " + "\n".join(self.problems)

    async def screenshot(self, name: str, *, full_page: bool = True) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        if full_page:  # from the top (a sticky header would otherwise sit mid-picture)
            await self.page.evaluate("window.scrollTo(0, 0)")
        await self.page.screenshot(path=str(path), full_page=full_page)
        return path


@contextlib.asynccontextmanager
async def open_page(browser, viewport: dict | None = None, **context_options) -> AsyncIterator[Tab]:
    context = await browser.new_context(viewport=viewport or LAPTOP, **context_options)
    page = await context.new_page()
    tab = Tab(context, page)

    def on_console(msg) -> None:
        # A failed fetch's status (a deliberate 401 or 403) is logged as "Failed to load
        # resource": the tests check those answers themselves. Anything else is a problem.
        if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
            tab.problems.append(msg.text)

    def on_response(resp) -> None:
        from urllib.parse import urlsplit

        tab.responses.append((resp.request.method, urlsplit(resp.url).path, resp.status))

    page.on("console", on_console)
    page.on("pageerror", lambda exc: tab.problems.append(f"uncaught: {exc}"))
    page.on("response", on_response)
    try:
        yield tab
    finally:
        await context.close()
