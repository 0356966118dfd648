"""The API reference over the document: ``/docs`` (Swagger UI, served from the
``swagger-ui-bundle-v2`` package, no other origin; without scripts, the plain list of
operations) and ``/docs/plain`` (no scripts at all)."""

from __future__ import annotations

import html
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from .openapi import served_document
from .operations import HTML, TEXT, Schema, public
from .web import PAGE_HEADERS, assets, swagger_ui_dir, web_dir


def render_html(doc: dict[str, Any]) -> str:
    """The paths, parameters and responses of ``doc`` as one plain page."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset=utf-8>",
        f"<title>{esc(doc['info']['title'])} API</title></head><body>",
        f"<h1>{esc(doc['info']['title'])} API</h1><p>{esc(doc['info']['description'])}</p>",
        '<p>The machine-readable document: <a href="/openapi.json">/openapi.json</a></p>',
        *_operations_html(doc),
        "</body></html>",
    ]
    return "\n".join(parts)


def _operations_html(doc: dict[str, Any]) -> list[str]:
    esc = html.escape
    parts: list[str] = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            parts.append(f"<h2><code>{method.upper()} {esc(path)}</code></h2>")
            parts.append(f"<p>{esc(op.get('summary', ''))}</p>")
            params = [*item.get("parameters", []), *op.get("parameters", [])]
            names = [_param_name(doc, p) for p in params]
            if names:
                parts.append("<p>Parameters: " + ", ".join(map(esc, names)) + "</p>")
            codes = ", ".join(esc(code) for code in op["responses"])
            parts.append(f"<p>Responses: {codes}</p>")
    return parts


def render_reference(doc: dict[str, Any]) -> str:
    """``/docs`` (``web/docs.html``): Swagger UI over ``/openapi.json``; without scripts,
    the plain list of operations."""
    page = (web_dir() / "docs.html").read_text(encoding="utf-8")
    return page.replace("{operations}", "\n".join(_operations_html(doc)))


def _param_name(doc: dict[str, Any], param: Schema) -> str:
    if "$ref" in param:
        param = doc["components"]["parameters"][param["$ref"].rsplit("/", 1)[1]]
    return f"{param['name']} ({param['in']})"


@public("docsPlain", "ops", "This document as a page without scripts", media=HTML, schema=TEXT)
async def docs_endpoint(request: Request) -> Response:
    """``GET /docs/plain``: readable without scripts or any other origin."""
    headers = {"Content-Security-Policy": "default-src 'none'", "Cache-Control": "no-cache"}
    return HTMLResponse(render_html(served_document(request)), headers=headers)


@public("docs", "ops", "The API reference: Swagger UI over this document", media=HTML, schema=TEXT)
async def reference_endpoint(request: Request) -> Response:
    """``GET /docs``: the pages' own policy (our scripts and styles, this origin only)."""
    return HTMLResponse(render_reference(served_document(request)), headers=PAGE_HEADERS)


routes: list[BaseRoute] = [
    Route("/docs", reference_endpoint, methods=["GET"]),
    Route("/docs/plain", docs_endpoint, methods=["GET"]),
    Mount(
        "/docs/assets",
        app=assets(swagger_ui_dir(), "docsAssets", "The API reference's Swagger UI files"),
        name="docs-assets",
    ),
]
