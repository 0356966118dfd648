"""The ASGI application: lifespan (Redis, queue, store), error handlers, health routes."""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import api, docs, metrics, openapi, sse, stats, web
from .auth import Authenticator
from .data_plane import connect_data
from .errors import ApiError, PushsvcError
from .events import EventBus, make_bus
from .guard import RequestGuard
from .jobs import Registry, load_job_modules
from .line import Line
from .models import Health, Ready
from .operations import TEXT, Reply, public
from .outbox import Outbox
from .queue import Queue, connect
from .reads import BulkReads
from .responses import RAW_SEND, Drain, JSONResponse
from .settings import Settings
from .stats import StatsReader
from .store import JobStore

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("pushsvc.access")


@dataclass
class Services:
    """What the lifespan opens and the handlers share (``api.services(request)``)."""

    settings: Settings
    redis: Redis
    store: JobStore
    queue: Queue
    auth: Authenticator
    types: Registry
    bus: EventBus
    drain: Drain
    reads: BulkReads
    line: Line
    outbox: Outbox
    open_streams: dict[str, int] = field(default_factory=dict)  # per tenant, this process


def error_response(
    exc: PushsvcError, status: int, headers: Mapping[str, str] | None = None
) -> Response:
    return JSONResponse(exc.to_dict(), status_code=status, headers=headers)


async def api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc, exc.status_code, exc.headers)


# Redis answers these while it cannot serve (loading, failover, out of memory): a 503.
UNAVAILABLE_REPLIES = ("LOADING", "READONLY", "MASTERDOWN", "OOM", "BUSY", "TRYAGAIN")


async def redis_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ResponseError) and not str(exc).startswith(UNAVAILABLE_REPLIES):
        return await internal_error(request, exc)  # a bug of ours, not an outage
    logger.warning("Redis unavailable: %s", exc)
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


@public("metrics", "ops", "Prometheus metrics of this process", media="text/plain", schema=TEXT)
async def metrics_endpoint(request: Request) -> Response:
    """Prometheus, behind ``PUSHSVC_METRICS_TOKEN`` when one is set."""
    svc: Services = request.app.state.services
    svc.auth.check_metrics(request)
    return await metrics.metrics(request)


_UNREADY = Reply(503, "Redis is unreachable", Ready)


@public("healthz", "ops", "Liveness", Health)
async def healthz(_request: Request) -> Response:
    return JSONResponse(Health().model_dump())


@public("readyz", "ops", "Readiness: Redis answers", Ready, more=(_UNREADY,))
async def readyz(request: Request) -> Response:
    svc: Services = request.app.state.services
    try:
        await svc.redis.ping()
        if not svc.store.one_plane:
            await svc.store.redis.ping()
    except (RedisError, OSError):
        return JSONResponse(Ready(status="unavailable", redis=False).model_dump(), status_code=503)
    return JSONResponse(Ready(status="ok", redis=True).model_dump())


# Every route, in the API document's order (openapi.py walks them).
ROUTES: list[BaseRoute] = [
    *api.routes,
    *sse.routes,
    *stats.routes,
    Route("/healthz", healthz),
    Route("/readyz", readyz),
    Route("/metrics", metrics_endpoint),
    *openapi.routes,
    *docs.routes,
    *web.routes,
]


_frozen = False
# The collector's full passes: one per this many middle-generation passes, at most.
FULL_PASS_EVERY = 100


def _freeze_startup_heap() -> None:
    """Once per process, at the first startup: collect, then leave what the imports and
    the startup made (objects that all live as long as the process) out of the
    collector's full passes. A full pass over them held the event loop long enough to
    show in the herd's p99, and the allocations of a burst of requests (a herd of
    streams reopening) set one off: every other request waited. Frozen objects are still
    freed by reference counting; only reference cycles among them would stay.

    The collector holds back a full pass until the long-lived objects grew by a quarter;
    frozen ones no longer count, so a pass came every 10 middle ones (its threshold),
    walking every open stream's objects, still about once a herd. FULL_PASS_EVERY spaces
    them out; the young passes are unchanged. (The figures: BENCHMARKS.md.)"""
    global _frozen
    if _frozen:
        return
    _frozen = True
    gc.collect()
    gc.freeze()
    young, middle, full = gc.get_threshold()
    gc.set_threshold(young, middle, max(full, FULL_PASS_EVERY))


def create_app(settings: Settings, types: Registry | None = None) -> Starlette:
    """Build the app; Redis is opened by the lifespan and closed in reverse."""
    loaded = load_job_modules(settings)
    app = _App(
        routes=ROUTES,
        exception_handlers={
            ApiError: api_error,
            RedisError: redis_error,
            HTTPException: http_error,
            Exception: internal_error,
        },
        lifespan=_lifespan(settings, types or loaded),
        # The guard inside CORS: an allowed origin can read the errors it answers.
        middleware=[Middleware(AccessLog), *_cors(settings), Middleware(RequestGuard, settings)],
    )
    app.state.metrics = metrics.make_api_metrics(app)
    return app


class _App(Starlette):
    """Starlette, whose HTTP scopes carry the server's own ``send`` (``RAW_SEND``), for
    the streams' body writes (responses.py): through the four middleware wrappers, an
    event's write to each stream cost about a tenth of the API's CPU."""

    def build_middleware_stack(self) -> ASGIApp:
        return _KeepRawSend(super().build_middleware_stack())


class _KeepRawSend:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[RAW_SEND] = send
        await self.app(scope, receive, send)


def _lifespan(
    settings: Settings, types: Registry
) -> Callable[[Starlette], contextlib.AbstractAsyncContextManager[None]]:
    """What the app opens at startup (``Services``) and closes, in reverse, at shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        redis = connect(
            settings, settings.redis_pool_size, socket_connect_timeout=2, socket_timeout=10
        )
        data = connect_data(
            settings, settings.redis_pool_size, socket_connect_timeout=2, socket_timeout=10
        )
        try:
            queue, auth = Queue(redis, settings), Authenticator(settings)
            store = JobStore(redis if data is None else data, settings, queue=queue)
            async with (
                make_bus(settings, app.state.metrics.observe_event) as bus,
                Drain() as drain,
                BulkReads(store, settings) as reads,
                Line(redis, settings, data) as line,
                Outbox(store, queue) as outbox,
            ):
                app.state.services = Services(
                    settings, redis, store, queue, auth, types, bus, drain, reads, line, outbox
                )
                app.state.stats = StatsReader(redis, settings, data)
                _freeze_startup_heap()
                yield
        finally:
            if data is not None:
                await data.close_all()
            await redis.aclose()

    return lifespan


def _cors(settings: Settings) -> list[Middleware]:
    if not settings.cors_origins:
        return []  # off by default
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "Idempotency-Key",
                "Last-Event-ID",
                "If-None-Match",
            ],
            expose_headers=["ETag", "Location", "Retry-After", "Idempotent-Replayed"],
        )
    ]


class AccessLog:
    """Access lines without query strings: stream tokens travel in ``?token=``.

    uvicorn's own access log prints the query string, so the CLI turns it off. An
    exception that escapes the app before a response started is answered 500 by
    Starlette's outermost middleware: the line says 500, not the 0 no status gives.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [0]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            status[0] = status[0] or 500
            raise
        finally:
            access_logger.info(
                '"%s %s" %d %.1fms',
                scope["method"],
                scope["path"],
                status[0],
                (time.perf_counter() - started) * 1000,
            )
