"""Who is asking: API keys map to tenants (stream tokens join in sse.py's issue)."""

from __future__ import annotations

import hashlib

from starlette.requests import HTTPConnection

from .errors import Unauthorized
from .settings import Settings

LOCAL_TENANT = "local"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Authenticator:
    """Resolves a request's tenant from ``Authorization: Bearer <key>``."""

    def __init__(self, settings: Settings) -> None:
        # Looked up by digest: no key is compared character by character.
        self._tenants = {_digest(k): t for k, t in settings.api_keys.items()}

    @property
    def enabled(self) -> bool:
        return bool(self._tenants)

    def tenant(self, conn: HTTPConnection) -> str:
        if not self.enabled:
            return LOCAL_TENANT  # only allowed on loopback; the CLI refuses otherwise
        scheme, _, key = conn.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("send 'Authorization: Bearer <api key>'", code="missing_credentials")
        tenant = self._tenants.get(_digest(key.strip()))
        if tenant is None:
            raise Unauthorized("the API key is not valid", code="invalid_credentials")
        return tenant
