"""A worker's background loops: leases on its running attempts, the reaper of lapsed ones
(crash recovery), and the mover that hands delayed attempts to arq when they are due.

A running attempt holds a lease (``Keys.leases``) that its worker renews; when a worker
dies the lease lapses and any worker's reaper re-queues the job as a new attempt, or
fails it with ``worker_lost``. Leases are the queue's keys, apart from job state: the
worker takes an attempt's lease before its start transition (a job never runs without
one) and drops it after the attempt's last one; a lease left behind (a crash between,
a start refused) lapses, and the reaper drops it, as its job is not that attempt running.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import transitions
from .context import JobContext
from .errors import JobError
from .publish import Writer
from .queue import Queue
from .settings import Settings
from .store import JobStore
from .transitions import Transition

logger = logging.getLogger(__name__)

# What a lost attempt becomes when attempts remain: the runner's retry (a cancel asked
# meanwhile wins over it).
Requeue = Callable[[dict[str, Any], JobError], Awaitable[Transition]]


async def publish_as(store: JobStore, fields: dict[str, Any], change: Transition) -> None:
    """Publish ``change`` for an attempt this worker does not run (the reaper's)."""
    writer = Writer(fields["arq_id"])
    await transitions.publish(store, fields["id"], fields["tenant"], change, writer=writer)


class Leases:
    """The lease, reaper and mover loops of one worker process, started and stopped by
    its arq hooks; ``running`` (arq id -> attempt) is the runner's, read here."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        queue: Queue,
        running: Mapping[str, JobContext],
        requeue: Requeue,
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self.running = running
        self.requeue = requeue
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        # arq calls its startup hook again each time run_worker re-enters its loop after
        # an outage: the loops start once.
        if not any(not t.done() for t in self._tasks):
            self._tasks = [
                asyncio.create_task(self._lease_loop(), name="pushsvc-leases"),
                asyncio.create_task(self._move_loop(), name="pushsvc-delayed"),
            ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def deadline(self) -> float:
        """A lease taken or renewed now lapses at this time (ms)."""
        return (time.time() + self.settings.lease_s) * 1000

    async def take(self, arq_id: str) -> None:
        """Hold the lease of an attempt about to start."""
        await self.store.queue.redis.zadd(self.store.keys.leases, {arq_id: self.deadline()})

    async def drop(self, arq_id: str) -> None:
        """Let go of the lease of an attempt that no longer runs here; one that cannot be
        dropped now lapses, and the reaper drops it."""
        try:
            await self.store.queue.redis.zrem(self.store.keys.leases, arq_id)
        except RedisError as exc:
            logger.warning("the lease of %s was not dropped (%s); it lapses", arq_id, exc)

    async def _move_loop(self) -> None:
        """Hand attempts whose backoff is over to arq (see Queue.prepare)."""
        while True:
            try:
                await self.queue.move_due()
            except (RedisConnectionError, RedisTimeoutError):
                logger.warning("moving delayed attempts failed; retrying", exc_info=True)
            await asyncio.sleep(self.settings.poll_delay_s)

    async def _lease_loop(self) -> None:
        period = self.settings.lease_s / 3
        while True:
            try:
                for attempt in list(self.running.values()):
                    await attempt.keep_lease(self.deadline())
                await self.store.queue.redis.zadd(
                    self.store.keys.workers, {self.worker_id: time.time() * 1000}
                )
                await self.reap()
            except (RedisConnectionError, RedisTimeoutError):
                logger.warning("lease renewal or reaping failed; retrying", exc_info=True)
            await asyncio.sleep(period)

    async def _lapsed_job(self, arq_id: str) -> dict[str, Any] | None:
        """The job of a lapsed attempt: whose it is from keys.job_tenant, or from the
        attempt's arq job when that has expired (an attempt longer than the jobs' TTL)."""
        job_id = arq_id.rsplit(".", 1)[0]
        fields = await self.store.load_by_id(job_id)
        if fields is None and (tenant := await self.queue.tenant_of(arq_id)) is not None:
            fields = await self.store.load(tenant, job_id)
        return fields

    async def reap(self) -> int:
        """Recover jobs whose worker stopped renewing their lease; returns how many.

        Every worker reaps; the transition names the lapsed attempt, so exactly one
        reaper's write lands; the lease goes after it (a reaper that dies between leaves
        it to the next, which finds the job no longer that attempt running).
        """
        leases = self.store.keys.leases
        lapsed = await self.store.queue.redis.zrangebyscore(leases, "-inf", time.time() * 1000)
        recovered = 0
        for member in lapsed:
            arq_id = member.decode()
            if arq_id in self.running:
                continue  # ours: the lease check just renewed or repaired it
            fields = await self._lapsed_job(arq_id)
            if fields is None or fields.get("arq_id") != arq_id or fields["status"] != "running":
                await self.store.queue.redis.zrem(leases, member)  # nothing left to recover
                if fields is not None and fields.get("arq_id") == arq_id:
                    # Its job still names the attempt, not running it: queued, its
                    # worker stopped before the start (or a snapshot caught one there).
                    # arq delivers it again now, not once its mark of the pick expires.
                    await self.queue.unmark_picked(arq_id)
                continue
            await self.recover(fields)
            await self.queue.forget(arq_id, fields.get("priority", "normal"), fields["tenant"])
            await self.store.queue.redis.zrem(leases, member)  # the attempt's transition is written
            recovered += 1
        return recovered

    async def recover(self, fields: dict[str, Any]) -> None:
        exc = JobError("the worker running this job stopped", code="worker_lost", retryable=True)
        if fields["attempt"] < fields["max_attempts"]:
            await publish_as(self.store, fields, await self.requeue(fields, exc))
        else:
            await publish_as(self.store, fields, transitions.fail(exc))
