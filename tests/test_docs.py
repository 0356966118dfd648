"""The API reference (pushsvc/docs.py): the plain page rendered from a document, and
``/docs`` and ``/docs/plain`` served by a real API."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from pushsvc.docs import render_html

DOC = {
    "info": {"title": "T<x>", "description": "about"},
    "components": {"parameters": {"JobId": {"name": "job_id", "in": "path"}}},
    "paths": {
        "/v1/jobs/{job_id}": {
            "parameters": [{"$ref": "#/components/parameters/JobId"}],
            "get": {"summary": "Get a job", "responses": {"200": {}, "404": {}}},
        }
    },
}


@pytest.mark.timeout(10)
def test_the_plain_page_lists_operations_parameters_and_responses() -> None:
    page = render_html(DOC)
    assert "<title>T&lt;x&gt; API</title>" in page
    assert "<code>GET /v1/jobs/{job_id}</code>" in page
    assert "Parameters: job_id (path)" in page and "Responses: 200, 404" in page


@pytest.mark.timeout(30)
async def test_a_real_api_serves_both_pages(stack: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=stack["api"].url) as http:
        plain = await http.get("/docs/plain")
        ui = await http.get("/docs")
    assert plain.status_code == 200 and "POST /v1/jobs" in plain.text
    assert plain.headers["content-security-policy"] == "default-src 'none'"
    assert ui.status_code == 200 and "{operations}" not in ui.text
    assert "POST /v1/jobs" in ui.text
