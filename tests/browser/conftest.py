"""Real headless Chromium (Debian's) for the browser tests, driven by Playwright."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Route, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WIDE = {"width": 1280, "height": 860}
WEB = Path(__file__).resolve().parents[2] / "web"
ORIGIN = "http://pages.test"  # made up: the page's routes answer for it
TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail("browser tests need Debian's chromium: apt-get install -y chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page (empty localStorage); fails the test on any uncaught page error."""
    context = browser.new_context(viewport=WIDE)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(20_000)
    yield page
    context.close()
    assert not errors, errors


def serve_web(page: Page, answers: dict[str, Callable[[Route], None]] | None = None) -> str:
    """Open a blank page on a made-up origin whose ``/static/`` is ``web/``, so pushsvc.js
    runs without a server; ``answers`` maps other paths to handlers (a fake API)."""
    answers = answers or {}

    def serve(route: Route) -> None:
        path = route.request.url.removeprefix(ORIGIN).split("?")[0]
        if path in answers:
            answers[path](route)
        elif path.startswith("/static/") and (WEB / path.removeprefix("/static/")).is_file():
            file = WEB / path.removeprefix("/static/")
            route.fulfill(body=file.read_text(), content_type=TYPES.get(file.suffix, "text/plain"))
        elif path == "/":
            route.fulfill(body="<!doctype html><title>pages</title>", content_type="text/html")
        else:
            route.fulfill(status=404, body="{}", content_type="application/json")

    page.route(f"{ORIGIN}/**", serve)
    page.goto(f"{ORIGIN}/")
    return ORIGIN
