"""What a request must be before any handler sees it: JSON bodies only, and without API
keys (the one local user on loopback) loopback Host names and same-origin pages only.

Any web page can make a browser send a ``text/plain`` POST to ``http://127.0.0.1:8000``
(no preflight), or rebind its own name to 127.0.0.1 and read the answers. Requiring
``Content-Type: application/json`` for bodies forces a preflight on other origins; the
Host check defeats DNS rebinding; the Origin / ``Sec-Fetch-Site`` check refuses
cross-site requests that need no body (``POST /v1/jobs/{id}/retry``). With API keys a
page cannot send the ``Authorization`` header without CORS, so only the body check runs.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ApiError, Forbidden, MisdirectedRequest, UnsupportedMediaType
from .responses import JSONResponse
from .settings import Settings

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": 80, "https": 443}


class RequestGuard:
    """ASGI middleware: refuses, with the JSON error shape, what no handler should see."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.keyless = not settings.auth_enabled
        self.hosts = HostNames(settings.allowed_hosts)
        self.origins = frozenset(o.rstrip("/").lower() for o in settings.cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refused = self.check(scope["method"], Headers(scope=scope))
            if refused is not None:
                response = JSONResponse(
                    refused.to_dict(), refused.status_code, headers=refused.headers
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, method: str, headers: Headers) -> ApiError | None:
        """The error to answer instead of the handler, or None."""
        if self.keyless:
            host = headers.get("host", "")
            if not self.hosts.allows(host):
                return MisdirectedRequest(
                    f"this API has no API keys and answers only loopback names, not "
                    f"{host[:100]!r}; add the name to PUSHSVC_ALLOWED_HOSTS",
                    code="host_not_allowed",
                )
            if self._cross_site(method, headers, host):
                return Forbidden(
                    "this API has no API keys and refuses requests from other sites; "
                    "add the page's origin to PUSHSVC_CORS_ORIGINS",
                    code="cross_site_request",
                )
        if method not in SAFE_METHODS and has_body(headers) and not is_json(headers):
            return UnsupportedMediaType(
                "send the body as JSON, with 'Content-Type: application/json'",
                code="unsupported_media_type",
            )
        return None

    def _cross_site(self, method: str, headers: Headers, host: str) -> bool:
        origin = headers.get("origin")
        if origin is not None:
            origin = origin.rstrip("/").lower()
            allowed = origin in self.origins or "*" in self.origins
            return not allowed and not same_origin(origin, host)
        if headers.get("sec-fetch-site") not in ("cross-site", "same-site"):
            return False  # same-origin, none (typed in, a bookmark), or not a browser
        # No Origin: a link followed from another site to the console (harmless, and how
        # people arrive) or a no-cors subresource such as <img> or <script>.
        return not (method in ("GET", "HEAD") and headers.get("sec-fetch-mode") == "navigate")


def has_body(headers: Headers) -> bool:
    """Does the request carry a body (a non-zero Content-Length, or chunks)?"""
    length = headers.get("content-length", "").strip()
    return "transfer-encoding" in headers or (length != "" and length != "0")


def is_json(headers: Headers) -> bool:
    """``application/json``, with or without parameters (``; charset=utf-8``)."""
    media_type = headers.get("content-type", "").partition(";")[0]
    return media_type.strip().lower() == "application/json"


def split_host(host: str) -> tuple[str, int | None] | None:
    """``name[:port]`` (``[v6]:port`` too) as (lowercase name, port), or None if malformed."""
    if any(c in host for c in "@/\\?# "):  # "evil@127.0.0.1" would parse as 127.0.0.1
        return None
    try:
        parts = urlsplit(f"//{host}")
        return (parts.hostname or "").rstrip("."), parts.port
    except ValueError:  # a port that is not a number, an unclosed bracket
        return None


def same_origin(origin: str, host: str) -> bool:
    """Is ``origin`` (``scheme://name[:port]``) the origin the Host header names?"""
    try:
        parts = urlsplit(origin)
        origin_host, origin_port = (parts.hostname or "").rstrip("."), parts.port
    except ValueError:
        return False
    target = split_host(host)
    default = DEFAULT_PORTS.get(parts.scheme)
    if target is None or default is None or not origin_host:
        return False  # "null" (a sandboxed frame, a file), a malformed origin
    name, port = target
    return (origin_host, origin_port or default) == (name, port or default)


class HostNames:
    """The Host names a keyless API answers: loopback ones, and PUSHSVC_ALLOWED_HOSTS
    (``name``, ``*.domain`` for its subdomains, ``*`` for any)."""

    def __init__(self, extra: list[str]) -> None:
        names = {h.strip().lower().rstrip(".") for h in extra if h.strip()}
        self.any = "*" in names
        self.suffixes = tuple(n[1:] for n in names if n.startswith("*."))
        self.names = frozenset(n for n in names if not n.startswith("*"))

    def allows(self, host: str) -> bool:
        if self.any:
            return True
        parsed = split_host(host)
        if parsed is None or not parsed[0]:
            return False  # no Host header: no browser sends such a request
        name = parsed[0]
        return (
            is_loopback_name(name)
            or name in self.names
            or any(name.endswith(suffix) for suffix in self.suffixes)
        )


def is_loopback_name(name: str) -> bool:
    """localhost, a name under .localhost (RFC 6761: always loopback), a loopback IP."""
    return name.endswith(".localhost") or is_loopback(name)


def is_loopback(host: str) -> bool:
    """A bind address (or ``--url`` host) on this machine only: localhost or a loopback IP."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
