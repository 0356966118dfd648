"""The ASGI application: lifespan (Redis, queue, store), error handlers, health routes."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping

from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import api
from . import ticker as _ticker  # noqa: F401  (registers the built-in type)
from .api import Services
from .auth import Authenticator
from .errors import ApiError, PushsvcError
from .jobs import Registry, registry
from .queue import Queue, connect
from .settings import Settings
from .store import JobStore
from .worker import load_job_modules

logger = logging.getLogger(__name__)


def error_response(
    exc: PushsvcError, status: int, headers: Mapping[str, str] | None = None
) -> Response:
    return JSONResponse(exc.to_dict(), status_code=status, headers=headers)


async def api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc, exc.status_code, exc.headers)


async def redis_down(_request: Request, exc: Exception) -> Response:
    logger.warning("Redis unreachable: %s", exc)
    err = PushsvcError("the job store (Redis) is unreachable; try again", code="redis_unavailable")
    return error_response(err, 503, {"Retry-After": "1"})


async def http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    err = PushsvcError(exc.detail, code=codes.get(exc.status_code, "http_error"))
    return error_response(err, exc.status_code, exc.headers)


async def internal_error(_request: Request, exc: Exception) -> Response:
    logger.error("unhandled error", exc_info=exc)
    return error_response(PushsvcError("internal error", code="internal_error"), 500)


async def healthz(_request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    svc: Services = request.app.state.services
    try:
        await svc.redis.ping()
    except (RedisError, OSError):
        return JSONResponse({"status": "unavailable", "redis": False}, status_code=503)
    return JSONResponse({"status": "ok", "redis": True})


def create_app(settings: Settings, types: Registry | None = None) -> Starlette:
    """Build the app; Redis is opened by the lifespan and closed in reverse."""
    load_job_modules(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        redis = connect(settings, socket_connect_timeout=2, socket_timeout=10)
        store = JobStore(redis, settings)
        app.state.services = Services(
            settings,
            redis,
            store,
            Queue(redis, settings),
            Authenticator(settings),
            types or registry,
        )
        try:
            yield
        finally:
            await redis.aclose()

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            *api.routes,
        ],
        exception_handlers={
            ApiError: api_error,
            RedisError: redis_down,
            HTTPException: http_error,
            Exception: internal_error,
        },
        lifespan=lifespan,
    )
