"""Who is asking: API keys map to tenants; signed, short-lived stream tokens for browsers.

EventSource cannot send headers, so stream URLs carry ``?token=``: HMAC-SHA256 over
``{tenant, scope, expiry}`` with ``PUSHSVC_SECRET``, scoped to one job or to the tenant.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import secrets
import time

from starlette.requests import HTTPConnection

from .errors import Unauthorized
from .settings import Settings

LOCAL_TENANT = "local"
TENANT_SCOPE = "tenant"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def job_scope(job_id: str) -> str:
    return f"job:{job_id}"


class Authenticator:
    """Resolves a request's tenant from an API key, or a stream token where allowed."""

    def __init__(self, settings: Settings) -> None:
        # Looked up by digest: no key is compared character by character.
        self._tenants = {_digest(k): t for k, t in settings.api_keys.items()}
        self._admins = {_digest(k.get_secret_value()) for k in settings.admin_keys}
        metrics_token = settings.metrics_token.get_secret_value()
        self._metrics = _digest(metrics_token) if metrics_token else None
        # Without a configured secret, tokens are valid only in this process (dev).
        secret = settings.secret.get_secret_value() or secrets.token_hex(32)
        self._secret = secret.encode()
        self._ttl = settings.stream_token_ttl_s

    @property
    def enabled(self) -> bool:
        return bool(self._tenants)

    def tenant(self, conn: HTTPConnection) -> str:
        if not self.enabled:
            return LOCAL_TENANT  # only allowed on loopback; the CLI refuses otherwise
        tenant = self._tenants.get(_digest(_bearer(conn)))
        if tenant is None:
            raise Unauthorized("the API key is not valid", code="invalid_credentials")
        return tenant

    def viewer(self, conn: HTTPConnection) -> str | None:
        """Whose figures a stats request sees: ``None`` for an operator (an admin key, or
        the one local user without API keys: every tenant's), else its tenant."""
        if not self.enabled:
            return None
        key = _digest(_bearer(conn))
        if key in self._admins:
            return None
        tenant = self._tenants.get(key)
        if tenant is None:
            raise Unauthorized("the API key is not valid", code="invalid_credentials")
        return tenant

    def stream_viewer(self, conn: HTTPConnection) -> str | None:
        """As :meth:`viewer`, for a stream: a ``?token=`` (tenant-scoped) names its tenant."""
        if conn.query_params.get("token") is None:
            return self.viewer(conn)
        tenant = self.stream_tenant(conn, {TENANT_SCOPE})
        return tenant if self.enabled else None  # the local user's token: the operator

    def check_metrics(self, conn: HTTPConnection) -> None:
        """``/metrics`` asks for ``PUSHSVC_METRICS_TOKEN`` as a bearer token, when set."""
        if self._metrics is not None and not hmac.compare_digest(
            _digest(_bearer(conn)), self._metrics
        ):
            raise Unauthorized("the metrics token is not valid", code="invalid_credentials")

    def stream_tenant(self, conn: HTTPConnection, scopes: set[str]) -> str:
        """The tenant of a stream request: a ``?token=`` with one of ``scopes``, or a key."""
        token = conn.query_params.get("token")
        if token is None:
            return self.tenant(conn)
        tenant, scope = self.verify(token)
        if scope not in scopes:
            raise Unauthorized("the token is not for this stream", code="invalid_token")
        return tenant

    def issue(self, tenant: str, scope: str) -> tuple[str, int]:
        """A token and its expiry (epoch seconds)."""
        expires = int(time.time()) + self._ttl
        body = _b64(json.dumps([tenant, scope, expires], separators=(",", ":")).encode())
        return f"{body}.{self._sign(body)}", expires

    def verify(self, token: str) -> tuple[str, str]:
        """The (tenant, scope) of a token this deployment signed and that has not expired."""
        body, _, signature = token.partition(".")
        # Bytes, not str: compare_digest refuses non-ASCII text (a 500 on a forged token).
        expected = self._sign(body).encode()
        if not hmac.compare_digest(signature.encode("utf-8", "replace"), expected):
            raise Unauthorized("the token is not valid", code="invalid_token")
        claims = _claims(body)
        if claims is None:  # signed with our secret, but not a shape this version issues
            raise Unauthorized("the token is not valid", code="invalid_token")
        tenant, scope, expires = claims
        if expires < time.time():
            raise Unauthorized("the token has expired", code="token_expired")
        return tenant, scope

    def _sign(self, body: str) -> str:
        raw = body.encode("utf-8", "replace")
        return _b64(hmac.new(self._secret, raw, hashlib.sha256).digest()[:24])


def _bearer(conn: HTTPConnection) -> str:
    scheme, _, key = conn.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("send 'Authorization: Bearer <api key>'", code="missing_credentials")
    return key.strip()


def _claims(body: str) -> tuple[str, str, float] | None:
    """``[tenant, scope, expiry]`` from a token's body, or None for any other shape (a
    token of another version signed with the same secret must be a 401, not a 500)."""
    try:
        claims = json.loads(_unb64(body))
    except ValueError:  # not base64 (binascii.Error), not UTF-8, not JSON: all ValueErrors
        return None
    match claims:
        case [str(tenant), str(scope), int() | float() as expires] if (
            tenant and scope and not isinstance(expires, bool)
        ):
            try:
                expiry = float(expires)
            except OverflowError:  # an integer of 400 digits
                return None
            return (tenant, scope, expiry) if math.isfinite(expiry) else None
    return None
