"""Runs attempts of jobs: state transitions, timeouts, retries with backoff, crash recovery.

Each attempt is an arq job whose id is stored in the job's ``arq_id``; an arq run whose
id is not the current one is stale and does nothing. A running attempt holds a lease
(``Keys.leases``) that its worker renews; when a worker dies the lease lapses and any
worker's reaper re-queues the job as a new attempt, or fails it with ``worker_lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import random
import secrets
import time
import warnings
from collections.abc import AsyncIterator
from typing import Any

from arq.connections import ArqRedis
from pydantic import ValidationError

from . import ticker as _ticker  # noqa: F401  (registers the built-in type)
from .errors import JobError
from .jobs import JobContext, JobType, Registry, registry
from .models import JobStatus
from .queue import Queue, connect, make_worker
from .settings import Settings
from .store import JobStore, Published

logger = logging.getLogger(__name__)
RUNNING = (JobStatus.RUNNING,)


def new_arq_id(job_id: str) -> str:
    return f"{job_id}.{secrets.token_hex(4)}"


def backoff_s(job_type: JobType[Any], attempt: int, settings: Settings, floor: float = 0) -> float:
    """Full-jitter exponential backoff, never below a server's ``Retry-After``."""
    base = job_type.retry.base_s * settings.retry_base_s
    cap = min(job_type.retry.max_s, settings.retry_max_s)
    return max(floor, random.uniform(0, min(cap, base * 2 ** (attempt - 1))))


def load_job_modules(settings: Settings) -> None:
    for name in settings.job_modules:
        importlib.import_module(name)


class Runner:
    """One worker process's job runner; arq calls :meth:`run` for every attempt."""

    def __init__(self, settings: Settings, redis: ArqRedis, types: Registry) -> None:
        self.settings = settings
        self.store = JobStore(redis, settings)
        self.queue = Queue(redis, settings)
        self.types = types
        self.running: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []

    # -- arq hooks ---------------------------------------------------------

    async def start(self, _ctx: dict[str, Any]) -> None:
        self._tasks = [asyncio.create_task(self._lease_loop(), name="pushsvc-leases")]

    async def stop(self, _ctx: dict[str, Any]) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def run(self, ctx: dict[str, Any], job_id: str) -> None:
        fields = await self.store.load(job_id)
        if fields is None or fields.get("arq_id") != ctx["job_id"]:
            return  # expired, or a stale arq run of an attempt that was superseded
        job_type = self.types.get(fields["type"])
        tenant, attempt = fields["tenant"], fields["attempt"]
        started = await self.store.publish(
            job_id,
            tenant,
            "status",
            {"status": "running", "attempt": attempt},
            {
                "status": "running",
                "started_at": time.time(),
                "progress": 0.0,
                "stage": None,
                "message": None,
                "output": "",
                "eta_s": None,
            },
            expect=(JobStatus.QUEUED,),
        )
        if not isinstance(started, Published):
            return  # cancelled before it started, or already taken
        self.running.add(job_id)
        await self._renew([job_id])
        try:
            await self._attempt(job_type, fields, attempt)
        finally:
            self.running.discard(job_id)
            await self.store.redis.zrem(self.store.keys.leases, job_id)

    # -- one attempt ---------------------------------------------------------

    async def _attempt(
        self, job_type: JobType[Any] | None, fields: dict[str, Any], attempt: int
    ) -> None:
        job_id, tenant = fields["id"], fields["tenant"]
        if job_type is None:
            err = JobError(
                f"no job type {fields['type']!r} in this worker", code="unknown_job_type"
            )
            await self._fail(fields, err)
            return
        ctx = JobContext(self.store, fields, self.settings.publish_rate_hz)
        try:
            payload = job_type.payload_model.model_validate(fields["payload"])
            async with asyncio.timeout(job_type.timeout_s):
                result = await job_type.func(ctx, payload)
        except asyncio.CancelledError:
            await self._on_cancelled(ctx, fields)
            raise
        except TimeoutError:
            await self._finish_failed(
                ctx,
                job_type,
                fields,
                JobError(f"the job ran past its {job_type.timeout_s:g} s timeout", code="timeout"),
            )
        except ValidationError as exc:
            await self._finish_failed(
                ctx,
                job_type,
                fields,
                JobError(
                    f"stored payload is invalid: {exc.error_count()} errors", code="invalid_payload"
                ),
            )
        except JobError as exc:
            await self._finish_failed(ctx, job_type, fields, exc)
        except Exception as exc:
            logger.exception("job %s (%s) raised", job_id, fields["type"])
            await self._finish_failed(
                ctx,
                job_type,
                fields,
                JobError(f"{type(exc).__name__}: {exc}", code="internal_error"),
            )
        else:
            await ctx.flush()
            await ctx.close()
            await self.store.publish(
                job_id,
                tenant,
                "completed",
                {"result": result},
                {
                    "status": "completed",
                    "result": result,
                    "progress": 100.0,
                    "eta_s": 0.0,
                    "finished_at": time.time(),
                },
                expect=RUNNING,
            )

    async def _finish_failed(
        self, ctx: JobContext, job_type: JobType[Any], fields: dict[str, Any], exc: JobError
    ) -> None:
        await ctx.flush()
        await ctx.close()
        attempt = fields["attempt"]
        if exc.retryable and attempt < fields["max_attempts"]:
            delay = backoff_s(job_type, attempt, self.settings, exc.retry_after_s or 0)
            await self._requeue(fields, exc, delay)
        else:
            await self._fail(fields, exc)

    async def _fail(self, fields: dict[str, Any], exc: JobError) -> None:
        error = exc.info()
        await self.store.publish(
            fields["id"],
            fields["tenant"],
            "failed",
            {"error": error},
            {"status": "failed", "error": error, "eta_s": None, "finished_at": time.time()},
            expect=RUNNING,
        )

    async def _requeue(self, fields: dict[str, Any], exc: JobError, delay: float) -> None:
        """Make the next attempt: visible as a ``status`` event, then enqueued with a delay."""
        job_id, arq_id, attempt = fields["id"], new_arq_id(fields["id"]), fields["attempt"] + 1
        error = exc.info()
        reply = await self.store.publish(
            job_id,
            fields["tenant"],
            "status",
            {"status": "queued", "attempt": attempt, "error": error, "retry_in_s": round(delay, 3)},
            {
                "status": "queued",
                "attempt": attempt,
                "arq_id": arq_id,
                "error": error,
                "eta_s": None,
            },
            expect=RUNNING,
        )
        if isinstance(reply, Published):
            await self.queue.enqueue(arq_id, job_id, defer_s=delay)

    async def _on_cancelled(self, ctx: JobContext, fields: dict[str, Any]) -> None:
        # Shielded: the publish must land even though this task is being cancelled.
        await asyncio.shield(self._settle_cancelled(ctx, fields))

    async def _settle_cancelled(self, ctx: JobContext, fields: dict[str, Any]) -> None:
        await ctx.close()
        current = await self.store.load(fields["id"])
        if current is not None and current.get("cancel") == "1":
            await self.store.publish(
                fields["id"],
                fields["tenant"],
                "cancelled",
                {},
                {"status": "cancelled", "eta_s": None, "finished_at": time.time()},
                expect=RUNNING,
            )
        else:  # the worker is shutting down: hand the job to another attempt
            await self.recover(fields, "worker_shutdown", "the worker stopped during the job")

    # -- leases and crash recovery --------------------------------------------

    async def _renew(self, job_ids: list[str]) -> None:
        deadline = (time.time() + self.settings.lease_s) * 1000
        await self.store.redis.zadd(self.store.keys.leases, dict.fromkeys(job_ids, deadline))

    async def _lease_loop(self) -> None:
        period = self.settings.lease_s / 3
        while True:
            try:
                if self.running:
                    await self._renew(list(self.running))
                await self.reap()
            except Exception:  # Redis blips must not end the loop
                logger.warning("lease renewal or reaping failed", exc_info=True)
            await asyncio.sleep(period)

    async def reap(self) -> int:
        """Recover jobs whose worker stopped renewing their lease; returns how many."""
        leases = self.store.keys.leases
        now_ms = time.time() * 1000
        expired = await self.store.redis.zrangebyscore(leases, "-inf", now_ms)
        recovered = 0
        for member in expired:
            # ZREM returns 1 for exactly one reaper, whichever worker gets there first.
            if await self.store.redis.zrem(leases, member) != 1:
                continue
            fields = await self.store.load(member.decode())
            if fields is not None and fields["status"] == JobStatus.RUNNING:
                await self.recover(fields, "worker_lost", "the worker running this job stopped")
                recovered += 1
        return recovered

    async def recover(self, fields: dict[str, Any], code: str, message: str) -> None:
        exc = JobError(message, code=code, retryable=True)
        if fields["attempt"] < fields["max_attempts"]:
            await self._requeue(fields, exc, 0.0)
        else:
            exc.retryable = False
            await self._fail(fields, exc)


@contextlib.asynccontextmanager
async def worker_session(
    settings: Settings, *, burst: bool = False, handle_signals: bool = True
) -> AsyncIterator[Any]:
    """Yield a ready arq worker (run it with ``await worker.async_run()``)."""
    load_job_modules(settings)
    redis = connect(settings)
    runner = Runner(settings, redis, registry)
    max_timeout = max((t.timeout_s for t in registry.types.values()), default=300.0)
    worker = make_worker(
        settings,
        redis,
        runner.run,
        max_timeout_s=max_timeout,
        on_startup=runner.start,
        on_shutdown=runner.stop,
        burst=burst,
        handle_signals=handle_signals,
    )
    try:
        yield worker
    finally:
        with warnings.catch_warnings():
            # arq 0.28 calls redis-py 5's deprecated close(); harmless, and arq is frozen.
            warnings.simplefilter("ignore", DeprecationWarning)
            await worker.close()
        await redis.aclose()


async def run_worker(settings: Settings) -> None:
    async with worker_session(settings) as worker:
        await worker.async_run()
