"""The only module that knows arq: JSON serialization, enqueue, abort, the worker.

arq is in maintenance-only mode upstream, so it stays behind this boundary. pushsvc
uses it as a delayed queue: every attempt of a job is its own arq job (``max_tries=1``),
and attempts, retries and crash recovery are pushsvc's (see worker.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss
from arq.worker import Worker, func
from redis.asyncio import ConnectionPool

from .keys import Keys
from .settings import Settings

RUN_FUNCTION = "pushsvc.run"


def _default(obj: Any) -> Any:
    # arq stores a failed job's exception as its result: keep it as plain data.
    if isinstance(obj, BaseException):
        return {"__exception__": type(obj).__name__, "message": str(obj)}
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _object_hook(obj: dict[str, Any]) -> Any:
    if obj.get("__exception__") == "CancelledError":
        return asyncio.CancelledError(obj.get("message", ""))
    return obj


def serialize(obj: Any) -> bytes:
    """arq's job_serializer: JSON, never pickle."""
    return json.dumps(obj, default=_default, separators=(",", ":")).encode()


def deserialize(data: bytes) -> Any:
    return json.loads(data, object_hook=_object_hook)


def connect(settings: Settings, **pool_kwargs: Any) -> ArqRedis:
    """A lazily connecting client (arq's enqueue on top of redis-py's asyncio client)."""
    pool = ConnectionPool.from_url(settings.redis_url, **pool_kwargs)
    return ArqRedis(
        pool,
        job_serializer=serialize,
        job_deserializer=deserialize,
        default_queue_name=Keys(settings.namespace).queue,
    )


class Queue:
    """Enqueue and abort attempts."""

    def __init__(self, redis: ArqRedis, settings: Settings) -> None:
        self.redis = redis
        self.queue_name = Keys(settings.namespace).queue

    async def enqueue(self, arq_id: str, job_id: str, defer_s: float = 0.0) -> None:
        await self.redis.enqueue_job(
            RUN_FUNCTION,
            job_id,
            _job_id=arq_id,
            _queue_name=self.queue_name,
            _defer_by=defer_s or None,
        )

    async def abort(self, arq_id: str) -> None:
        """Ask arq to cancel the attempt: dropped before it starts, or its task cancelled."""
        await self.redis.zadd(abort_jobs_ss, {arq_id: int(time.time() * 1000)})

    async def depth(self) -> int:
        return int(await self.redis.zcard(self.queue_name))


def make_worker(
    settings: Settings,
    redis: ArqRedis,
    run: Any,
    *,
    max_timeout_s: float,
    on_startup: Any,
    on_shutdown: Any,
    burst: bool = False,
    handle_signals: bool = True,
) -> Worker:
    """An arq worker whose one function runs a pushsvc attempt. Build it inside a loop."""
    return Worker(
        functions=[
            # pushsvc enforces each type's timeout itself; arq's is a backstop above it.
            func(run, name=RUN_FUNCTION, max_tries=1, keep_result=0, timeout=max_timeout_s + 30)
        ],
        redis_pool=redis,
        queue_name=Keys(settings.namespace).queue,
        burst=burst,
        poll_delay=settings.poll_delay_s,
        max_jobs=settings.worker_concurrency,
        keep_result=0,
        allow_abort_jobs=True,
        job_serializer=serialize,
        job_deserializer=deserialize,
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        handle_signals=handle_signals,
    )
