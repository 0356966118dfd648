"""Runs attempts of jobs: run -> attempt -> settle (timeouts, retries with backoff, cancel).

Each attempt is an arq job whose id is stored in the job's ``arq_id``; an arq run whose
id is not the current one is stale and does nothing. Leases, crash recovery and the
delayed attempts' mover are the worker's background loops (``leases.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from arq.connections import ArqRedis
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import transitions
from .backoff import Delays, ExponentialBackoff, floored, jittered
from .context import JobContext, Resources
from .data_plane import connect_data
from .errors import JobError
from .jobs import JobType, Registry, load_job_modules
from .leases import Leases, publish_as
from .logs import bind_job
from .metrics import WorkerMetrics
from .publish import Published, Throttled, Writer
from .queue import Enqueue, Queue, connect, deliver_again, make_worker, new_arq_id
from .settings import Settings
from .store import JobStore
from .transitions import Transition

logger = logging.getLogger(__name__)


def backoff_s(job_type: JobType[Any], attempt: int, settings: Settings, floor: float = 0) -> float:
    """Full-jitter exponential backoff, never below a server's ``Retry-After``."""
    return floored(job_type.retry.backoff(settings), attempt - 1, floor)


class Runner:
    """One worker process's job runner; arq calls :meth:`run` for every attempt."""

    def __init__(self, settings: Settings, redis: ArqRedis, types: Registry) -> None:
        self.settings = settings
        self.queue = Queue(redis, settings)
        # The data plane's own client when it is a cluster (closed in :meth:`stop`).
        self._data = connect_data(settings, socket_connect_timeout=2, socket_timeout=10)
        data = redis if self._data is None else self._data
        # Many jobs' flushes: one trip (batched).
        self.store = JobStore(data, settings, batched=True, queue=self.queue)
        self.types = types
        self.running: dict[str, JobContext] = {}  # arq id -> its attempt, for the leases
        known = {settings.llm_model, *settings.llm_prices, *settings.model_limits}
        self.metrics = WorkerMetrics(known)
        self.resources = Resources(settings, self.metrics.observe_llm)
        self.leases = Leases(settings, self.store, self.queue, self.running, self._lost)

    # -- arq hooks ---------------------------------------------------------

    async def start(self, _ctx: dict[str, Any]) -> None:
        self.leases.start()

    async def stop(self, _ctx: dict[str, Any]) -> None:
        await self.leases.stop()
        await self.resources.aclose()
        if self._data is not None:
            await self._data.close_all()

    async def run(self, ctx: dict[str, Any], job_id: str, tenant: str | None = None) -> None:
        """One delivery of an attempt. Until the attempt has started, Redis away (the job
        state's: a shard failing over, with the queue's Redis up) hands the delivery back
        to arq after a pause (up to 0.5 s, doubling to 8 s, here: arq's own delay would
        move it out of its turn), to be made again: else arq would count it done, and the job
        would wait for it, queued, for ever."""
        running: list[JobContext] = []
        try:
            await self._run(ctx, job_id, tenant, running)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            if running:
                raise
            tries: int = ctx.get("job_try") or 1
            delay = jittered(min(8.0, 0.5 * 2 ** min(tries - 1, 4)))
            again = "job %s: its state is unreachable (%s); delivered again in %.1f s"
            logger.warning(again, job_id, exc, delay)
            await asyncio.sleep(delay)
            raise deliver_again() from exc

    async def _run(
        self, ctx: dict[str, Any], job_id: str, tenant: str | None, running: list[JobContext]
    ) -> None:
        arq_id: str = ctx["job_id"]
        if tenant is None:  # queued by a version before the tenant-tagged keys
            logger.warning("job %s: queued by an earlier version; not found in this one", job_id)
            return
        fields = await self.store.load(tenant, job_id)
        if fields is None or fields.get("arq_id") != arq_id:
            return  # expired, or a stale arq run of an attempt that was superseded
        if fields.get("cancel") == "1":  # cancel asked while an earlier attempt ran
            await publish_as(self.store, fields, transitions.cancelled(transitions.QUEUED))
            self.metrics.outcomes.labels(fields["type"], "cancelled").inc()
            return
        if fields["status"] != "queued":
            return  # its start would be refused; a lease of that attempt is not this run's
        with bind_job(job_id, fields["tenant"], fields["type"], fields["attempt"]):
            await self.leases.take(arq_id)  # before the start: no job runs without one
            keep_lease = False
            try:
                try:
                    attempt = await self._start(fields, arq_id)
                except (RedisConnectionError, RedisTimeoutError):
                    # The start may have been made, its reply lost: the lease stays, to
                    # lapse unless a delivery again starts it; the reaper then takes a
                    # running attempt over, and drops the lease of one still queued.
                    keep_lease = True
                    raise
                if attempt is None:  # another delivery's lease is the same member: kept
                    keep_lease = await self._running_elsewhere(fields, arq_id)
                    return
                self.running[arq_id] = attempt
                running.append(attempt)
                try:
                    await self._attempt(self.types.get(fields["type"]), attempt)
                finally:
                    self.running.pop(arq_id, None)
                if attempt.superseded:
                    await self._after_superseded(fields, arq_id)
                    # Made again: a no-op unless the job waits for this very attempt,
                    # which arq would otherwise count done, and the job wait for ever.
                    raise deliver_again()
            finally:
                if not keep_lease:
                    await asyncio.shield(self.leases.drop(arq_id))

    async def _after_superseded(self, fields: dict[str, Any], arq_id: str) -> None:
        """An attempt stopped as superseded whose job waits, queued, for it: nothing took
        it over, its start was lost unseen by the epochs. Streams may hold positions of
        what was lost, in the same history: the tenant starts new ones."""
        tenant, job_id = fields["tenant"], fields["id"]

        async def check() -> None:
            now = await self.store.load(tenant, job_id)
            if now is not None and now["status"] == "queued" and now.get("arq_id") == arq_id:
                logger.warning("job %s: its start was lost; it runs again", job_id)
                await self.store.new_histories(tenant)
                # arq may have let it go meanwhile (another delivery, refused a start,
                # finished it): a no-op while arq holds it.
                prio = now.get("priority") or "normal"
                enqueue = self.queue.prepare(arq_id, job_id, priority=prio, tenant=tenant)
                await self.store.hand_over_now(tenant, job_id, enqueue)

        try:
            await self._reliably(check)  # through an outage, as the attempt's last writes
        except RedisError as exc:
            logger.warning("job %s: superseded; not checked further (%s)", job_id, exc)

    async def _running_elsewhere(self, fields: dict[str, Any], arq_id: str) -> bool:
        """Did another delivery of the same attempt start it meanwhile (its lease is the
        same member: it stays)?"""
        now = await self.store.load(fields["tenant"], fields["id"])
        return now is not None and now["status"] == "running" and now.get("arq_id") == arq_id

    async def _start(self, fields: dict[str, Any], arq_id: str) -> JobContext | None:
        """queued -> running, unless the tenant is at its running limit (then: later)."""
        limit = self.settings.tenant_max_running or None
        now = time.time()
        delay = jittered(self.settings.throttle_delay_s)
        change = transitions.start(fields, secrets.token_hex(6), now)
        started = await transitions.publish(
            self.store,
            fields["id"],
            fields["tenant"],
            change,
            writer=Writer(arq_id),
            max_running=limit,
            # At the tenant's limit the attempt is queued again, later, in the same call.
            enqueue=self._later(fields, delay) if limit else None,
        )
        if isinstance(started, Throttled):
            await self._waits_for_tenant(fields)
        if not isinstance(started, Published):
            return None
        await self._count_start(fields, arq_id)
        fields["started_at"] = now
        if fields["attempt"] == 1:
            wait = now - fields["created_at"]
            self.metrics.queue_wait.labels(fields["type"]).observe(max(0.0, wait))
        writer = Writer(arq_id, change.fields["owner"], started.position)
        return JobContext(self.store, fields, self.settings.publish_rate_hz, self.resources, writer)

    async def _count_start(self, fields: dict[str, Any], arq_id: str) -> None:
        """What a start tells the queue: its turn was taken (fair share) and one more
        attempt started (the start rate, line.py). Advisory figures: a failed call is
        let go (the attempt runs)."""
        try:
            await self.queue.started(arq_id, fields.get("priority", "normal"), fields["tenant"])
        except RedisError as exc:
            logger.warning("job %s: its start was not counted (%s)", fields["id"], exc)

    def _later(self, fields: dict[str, Any], delay: float) -> Enqueue:
        later = new_arq_id(fields["id"])
        priority = fields.get("priority", "normal")
        return self.queue.prepare(later, fields["id"], delay, priority, tenant=fields["tenant"])

    async def _waits_for_tenant(self, fields: dict[str, Any]) -> None:
        """Say once that the job waits for its tenant's running limit (each later check
        that finds the limit still full says nothing new). No ``until``: it starts when
        one of the tenant's running jobs ends, which nobody knows."""
        waiting = fields.get("waiting") or {}
        if waiting.get("reason") != "tenant_limit":
            change = transitions.wait_in_line("tenant_limit", None)
            await transitions.publish(self.store, fields["id"], fields["tenant"], change)

    # -- one attempt ---------------------------------------------------------

    async def _attempt(self, job_type: JobType[Any] | None, ctx: JobContext) -> None:
        fields = ctx.fields
        if job_type is None:
            missing = f"no job type {fields['type']!r} in this worker"
            await self._settle(ctx, None, JobError(missing, code="unknown_job_type"))
            return
        try:
            payload = job_type.payload_model.model_validate(fields["payload"])
        except ValidationError as exc:
            bad = f"stored payload is invalid: {exc.error_count()} errors"
            await self._settle(ctx, job_type, JobError(bad, code="invalid_payload"))
            return
        result, error = await self._run_job_func(ctx, job_type, payload)
        if ctx.superseded:
            await ctx.close()
            logger.warning("job %s: attempt superseded; stopped it", fields["id"])
            return
        # Shielded: the outcome must be recorded even if an abort lands right now.
        await asyncio.shield(self._settle(ctx, job_type, error, result))

    async def _run_job_func(
        self, ctx: JobContext, job_type: JobType[Any], payload: Any
    ) -> tuple[Any, JobError | None]:
        deadline = asyncio.timeout(job_type.timeout_s)
        # Its own task, so that an attempt found superseded can stop just the job.
        ctx.task = asyncio.ensure_future(job_type.func(ctx, payload))
        try:
            async with deadline:
                result = await ctx.task
            return json.loads(json.dumps(result)), None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if ctx.superseded and current is not None and not current.cancelling():
                return None, None
            await asyncio.shield(self._settle_cancelled(ctx))
            raise
        except TimeoutError as exc:
            if deadline.expired():
                limit = f"the job ran past its {job_type.timeout_s:g} s timeout"
                return None, JobError(limit, code="timeout")
            return None, JobError(f"timed out: {exc}", code="upstream_timeout", retryable=True)
        except JobError as exc:
            return None, exc
        except (TypeError, ValueError) as exc:
            if "JSON serializable" not in str(exc):
                return None, self._internal(ctx.fields, exc)
            return None, JobError(f"the job's result is not JSON: {exc}", code="invalid_result")
        except Exception as exc:
            return None, self._internal(ctx.fields, exc)

    def _internal(self, fields: dict[str, Any], exc: Exception) -> JobError:
        logger.exception("job %s (%s) raised", fields["id"], fields["type"], exc_info=exc)
        return JobError(f"{type(exc).__name__}: {exc}", code="internal_error")

    def _retries(
        self, fields: dict[str, Any], job_type: JobType[Any] | None, exc: JobError
    ) -> bool:
        remain = fields["attempt"] < fields["max_attempts"]
        return exc.retryable and job_type is not None and remain

    async def _settle(
        self,
        ctx: JobContext,
        job_type: JobType[Any] | None,
        error: JobError | None,
        result: Any = None,
    ) -> None:
        """Record the attempt's outcome: completed, a retry, or failed."""
        await ctx.close()
        await self._reliably(ctx.flush)
        if ctx.superseded:
            return
        fields = ctx.fields
        self._count(fields, error, job_type)
        if error is None:
            change = transitions.complete(result)
        elif self._retries(fields, job_type, error):
            assert job_type is not None
            delay = backoff_s(job_type, fields["attempt"], self.settings, error.retry_after_s or 0)
            change = await self._requeue(fields, error, delay, next_attempt=True)
        else:
            change = transitions.fail(error)
        call = secrets.token_hex(8)  # sent again after a lost reply: not made twice
        await self._reliably(lambda: ctx.apply(change, call))

    def _count(
        self, fields: dict[str, Any], error: JobError | None, job_type: JobType[Any] | None
    ) -> None:
        type_ = fields["type"]
        if error is None:
            self.metrics.outcomes.labels(type_, "completed").inc()
            started = fields.get("started_at") or time.time()
            self.metrics.duration.labels(type_).observe(max(0.0, time.time() - started))
        elif self._retries(fields, job_type, error):
            self.metrics.outcomes.labels(type_, "retried").inc()
        else:
            self.metrics.outcomes.labels(type_, "failed").inc()

    async def _reliably(self, call: Callable[[], Awaitable[Any]]) -> None:
        """Retry a write through a Redis outage for up to two lease periods."""
        give_up = time.monotonic() + 2 * self.settings.lease_s
        delays = Delays(ExponentialBackoff(cap=1.0, base=0.05))
        while True:
            try:
                await call()
                return
            except (RedisConnectionError, RedisTimeoutError):
                if time.monotonic() > give_up:
                    raise  # the lease lapses and a reaper takes the job over
                await asyncio.sleep(delays.next())

    async def _requeue(
        self, fields: dict[str, Any], exc: JobError, delay: float, *, next_attempt: bool
    ) -> Transition:
        """The job handed to a new arq job, visible as a ``status`` event; a cancel asked
        during this attempt wins over the retry."""
        current = await self.store.load(fields["tenant"], fields["id"])
        if current is not None and current.get("cancel") == "1":
            self.metrics.outcomes.labels(fields["type"], "cancelled").inc()
            return transitions.cancelled()
        job_id, arq_id = fields["id"], new_arq_id(fields["id"])
        attempt = fields["attempt"] + (1 if next_attempt else 0)
        priority = fields.get("priority", "normal")
        enqueue = self.queue.prepare(arq_id, job_id, delay, priority, tenant=fields["tenant"])
        return transitions.retry_later(exc, attempt, arq_id, delay, enqueue)

    async def _lost(self, fields: dict[str, Any], exc: JobError) -> Transition:
        """A lost attempt (its worker stopped) as a new attempt, for the reaper."""
        return await self._requeue(fields, exc, 0.0, next_attempt=True)

    async def _settle_cancelled(self, ctx: JobContext) -> None:
        await ctx.close()
        if ctx.superseded:
            return
        current = await self.store.load(ctx.tenant, ctx.job_id)
        if current is not None and current.get("cancel") == "1":
            await ctx.flush()
            self.metrics.outcomes.labels(ctx.fields["type"], "cancelled").inc()
            await ctx.apply(transitions.cancelled())
        else:  # the worker is shutting down: another worker takes the same attempt over
            exc = JobError(
                "the worker stopped during the job", code="worker_shutdown", retryable=True
            )
            await ctx.apply(await self._requeue(ctx.fields, exc, 0.0, next_attempt=False))


@contextlib.asynccontextmanager
async def worker_session(
    settings: Settings, *, burst: bool = False, handle_signals: bool = True
) -> AsyncIterator[Any]:
    """Yield a ready arq worker (run it with ``await worker.async_run()``)."""
    types = load_job_modules(settings)
    redis = connect(settings)
    runner = Runner(settings, redis, types)
    if settings.worker_metrics_port:
        runner.metrics.serve(settings.worker_metrics_port, runner.store)
    max_timeout = max((t.timeout_s for t in types.types.values()), default=300.0)
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
    """Run a worker until signalled, riding out Redis outages.

    arq's poll loop ends at the first Redis error; running jobs live on as tasks, so
    the loop is simply entered again once Redis answers.
    """
    async with worker_session(settings) as worker:
        delays = Delays(ExponentialBackoff(cap=5.0, base=0.1))
        while True:
            try:
                await worker.async_run()
                return
            except asyncio.CancelledError:
                return  # arq's SIGTERM/SIGINT handler cancelled its loop: a clean stop
            except (RedisConnectionError, RedisTimeoutError, WatchError, OSError) as exc:
                # (WatchError: arq's WATCH lost its connection mid-transaction)
                delay = delays.next()
                logger.warning("Redis unavailable (%s); polling again in %.1fs", exc, delay)
                await asyncio.sleep(delay)
