"""The browser side (pushsvc/web.py): the console and the dashboard served by a real API
with the pages' security headers, and static assets that revalidate."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from pushsvc.web import CSP, make_routes, web_dir


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("path", "page"), [("/", "index.html"), ("/dashboard", "dashboard.html")])
async def test_pages_are_served_with_their_policy(
    stack: dict[str, Any], path: str, page: str
) -> None:
    async with httpx.AsyncClient(base_url=stack["api"].url) as http:
        resp = await http.get(path)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert resp.headers["content-security-policy"] == CSP
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["referrer-policy"] == "no-referrer"
    assert resp.content == (web_dir() / page).read_bytes()


@pytest.mark.timeout(30)
async def test_assets_revalidate_and_missing_ones_are_404(stack: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=stack["api"].url) as http:
        asset = await http.get("/static/pushsvc.js")
        missing = await http.get("/static/no-such-file.js")
    assert asset.status_code == 200 and asset.headers["cache-control"] == "no-cache"
    assert asset.headers["x-content-type-options"] == "nosniff" and "etag" in asset.headers
    assert missing.status_code == 404


@pytest.mark.timeout(10)
def test_the_routes_are_the_console_the_dashboard_and_static() -> None:
    paths = [getattr(r, "path", None) for r in make_routes(web_dir())]
    assert paths == ["/", "/dashboard", "/static"]
    assert "script-src 'self'" in CSP and "frame-ancestors 'none'" in CSP
