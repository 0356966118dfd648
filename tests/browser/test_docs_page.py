"""The API reference at ``/docs`` (Swagger UI from the ``swagger-ui-bundle-v2`` package) in
real Chromium against a real API: it renders every operation from ``/openapi.json``, under
the pages' CSP, with no request to any other origin; ``/docs/plain`` needs no script.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, expect

from pushsvc.app import ROUTES
from pushsvc.jobs import registry
from pushsvc.openapi import openapi_document

from ..procs import Api
from .test_web import shoot

expect.set_options(timeout=20_000)


def record(page: Page) -> tuple[list[str], list[str]]:
    """Every URL the page requests, and every console message that is an error."""
    urls: list[str] = []
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    def on_request(request: Request) -> None:
        urls.append(request.url)

    page.on("request", on_request)
    page.on("console", on_console)
    return urls, errors


def test_docs_and_its_assets_are_served(stack: dict[str, Any]) -> None:
    base = stack["api"].url
    page = httpx.get(f"{base}/docs", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "/docs/assets/swagger-ui-bundle.js" in page.text
    assert "/static/docs.js" in page.text
    assert not re.search(r"<script>|\bon\w+=", page.text)  # no inline script for the CSP
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text)  # nothing from elsewhere
    bundle = httpx.get(f"{base}/docs/assets/swagger-ui-bundle.js", timeout=10)
    assert bundle.status_code == 200 and "javascript" in bundle.headers["content-type"]
    assert bundle.headers["cache-control"] == "no-cache"
    assert bundle.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(f"{base}/docs/assets/swagger-ui.css", timeout=10).status_code == 200
    missing = httpx.get(f"{base}/docs/assets/nope.js", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_plain_page_needs_no_script(stack: dict[str, Any]) -> None:
    page = httpx.get(f"{stack['api'].url}/docs/plain", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-security-policy"] == "default-src 'none'"
    assert "<script" not in page.text.lower() and "POST /v1/jobs" in page.text


@pytest.mark.timeout(60)
def test_reference_renders_every_operation_from_this_origin_only(
    stack: dict[str, Any], page: Page
) -> None:
    api: Api = stack["api"]
    urls, errors = record(page)
    page.goto(f"{api.url}/docs")

    submit = page.locator("#operations-jobs-submitJob")
    expect(submit).to_be_visible()
    expect(submit.locator(".opblock-summary-method")).to_have_text("POST")
    expect(submit.locator(".opblock-summary-path")).to_have_text("/v1/jobs")
    # Every documented operation, each under its tag.
    doc = openapi_document(registry, routes=ROUTES)
    count = sum(1 for item in doc["paths"].values() for m in item if m != "parameters")
    expect(page.locator(".opblock")).to_have_count(count)
    expect(page.get_by_role("button", name=re.compile("Authorize"))).to_be_visible()
    # The shapes: the body's schema and an example (a whole one: with its "type"), a click
    # away.
    submit.locator(".opblock-summary").click()
    expect(submit.locator(".opblock-section-request-body")).to_be_visible()
    expect(submit.locator(".body-param__example, .highlight-code").first).to_contain_text('"type"')
    shoot(page, "api-reference.png")

    # The console and the dashboard are linked from here, and link back.
    nav = page.get_by_role("navigation", name="Pages")
    expect(nav.get_by_role("link", name="Job console")).to_have_attribute("href", "/")
    expect(nav.get_by_role("link", name="Dashboard")).to_have_attribute("href", "/dashboard")
    elsewhere = [url for url in urls if not url.startswith(f"{api.url}/")]
    assert elsewhere == [], elsewhere
    assert f"{api.url}/openapi.json" in urls
    assert errors == [], errors  # no CSP violation, nothing failed to load


@pytest.mark.timeout(60)
def test_try_it_out_sends_the_consoles_api_key(stack: dict[str, Any], page: Page) -> None:
    """The key the console keeps in this browser authorizes "Try it out" at once."""
    api: Api = stack["api"]
    page.add_init_script("localStorage.setItem('pushsvc.apiKey', 'key-a')")
    page.goto(f"{api.url}/docs")
    types = page.locator("#operations-jobs-listJobTypes")
    types.locator(".opblock-summary").click()
    types.get_by_role("button", name="Try it out").click()
    types.get_by_role("button", name="Execute").click()
    status = types.locator(".live-responses-table tbody .response-col_status").first
    expect(status).to_contain_text("200")
    expect(types.locator(".live-responses-table .highlight-code")).to_contain_text('"ticker"')


def test_without_scripts_docs_lists_every_operation(
    stack: dict[str, Any], browser: Browser
) -> None:
    context = browser.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        page.goto(f"{stack['api'].url}/docs")
        expect(page.get_by_text("POST /v1/jobs", exact=True)).to_be_visible()
        expect(page.get_by_role("link", name="Plain page")).to_have_attribute("href", "/docs/plain")
    finally:
        context.close()
