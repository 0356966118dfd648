"""The browser side: the job console at ``/``, the dashboard at ``/dashboard``, and the
static assets (``pushsvc.js``) under ``/static/``, served from the package's ``_web``
(wheels) or the repository's ``web/``; where the API reference's Swagger UI files are.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from .errors import NotFound
from .operations import HTML, TEXT, public

# The pages load only our own files and talk only to this origin.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
ASSET_HEADERS = [(b"cache-control", b"no-cache"), (b"x-content-type-options", b"nosniff")]


def swagger_ui_dir() -> Path:
    """Swagger UI's files (``swagger-ui-bundle.js``, ``swagger-ui.css``), as the
    ``swagger-ui-bundle-v2`` package ships them: /docs loads nothing from elsewhere."""
    from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

    return Path(swagger_ui_path)


def web_dir() -> Path:
    """``pushsvc/_web`` in an installed wheel, else the repository's top-level ``web/``."""
    packaged = Path(__file__).resolve().parent / "_web"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "web"


class Assets(StaticFiles):
    """Static files that revalidate (ETag) rather than go stale after a deploy."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *ASSET_HEADERS]
            await send(message)

        await super().__call__(scope, receive, send_with_headers)


def assets(directory: Path, op_id: str, summary: str) -> Assets:
    """The files under ``directory``, declared for the API document."""
    files = public(op_id, "web", summary, media="*/*", schema={}, errors=(NotFound,))
    return files(Assets(directory=directory))


def make_routes(directory: Path) -> list[BaseRoute]:
    index = directory / "index.html"
    board = directory / "dashboard.html"

    @public("console", "web", "The job console", media=HTML, schema=TEXT)
    async def console(_request: Request) -> Response:
        return FileResponse(index, media_type="text/html", headers=PAGE_HEADERS)

    summary = "The live dashboard (stats and alerts over SSE)"

    @public("dashboard", "web", summary, media=HTML, schema=TEXT)
    async def dashboard(_request: Request) -> Response:
        return FileResponse(board, media_type="text/html", headers=PAGE_HEADERS)

    static = assets(directory, "static", "The browser client and the console's assets")
    return [
        Route("/", console, methods=["GET", "HEAD"]),
        Route("/dashboard", dashboard, methods=["GET", "HEAD"]),
        Mount("/static", app=static, name="static"),
    ]


routes: list[BaseRoute] = make_routes(web_dir())
