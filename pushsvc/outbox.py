"""New jobs' first attempts, from the job store to arq's queue: the mover hands each
over as its job is made; the sweeper hands over those a crash left behind.

Job state and the queue are two planes: on a Redis Cluster the first cannot share a
script with arq's keys, so making a job and queueing its first attempt are two calls.
The job is made with the attempt in its tenant's outbox (lua/create.lua); the API hands
the attempt to arq at once (``Queue.hand_over``: arq's job-id dedup makes a second hand
over a no-op) and takes it out of the outbox. An API process that dies in between
leaves it there, and so does a Redis error between the two calls: every API process
sweeps its tenants' outboxes every ``outbox_sweep_s`` and hands over what has waited
longer than that while its job still waits for that attempt. So no job stays queued for
ever, and none runs twice: a worker starts an attempt only while its job is queued for
that attempt (the start transition's check), whatever arq holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from redis.exceptions import RedisError

from .queue import Enqueue, Queue
from .store import JobStore

logger = logging.getLogger(__name__)

BATCH = 500  # attempts one sweep takes from one tenant's outbox


class Outbox:
    """Hands the tenants' new attempts to arq (see the module's docstring)."""

    def __init__(self, store: JobStore, queue: Queue, tenants: Iterable[str]) -> None:
        self.store, self.queue, self.keys = store, queue, store.keys
        self.tenants = sorted(set(tenants))
        self.grace_s = store.settings.outbox_sweep_s
        self.swept = 0  # attempts the sweeper handed over (a crash or an error left them)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Outbox:
        self._task = asyncio.create_task(self._run(), name="pushsvc-outbox")
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def move(self, tenant: str, enqueue: Enqueue) -> None:
        """Hand a new job's first attempt to arq and take it out of the outbox: one call
        while both are on one Redis (with two planes, two: the hand-over first)."""
        await self.queue.hand_over(enqueue, self.keys.outbox(tenant))

    async def sweep(self) -> int:
        """Hand over the attempts that waited in an outbox longer than the grace; how
        many. Those whose job no longer waits for them (started, cancelled, gone) just
        leave the outbox."""
        before = int((time.time() - self.grace_s) * 1000)
        async with self.store.redis.pipeline(transaction=False) as pipe:
            for tenant in self.tenants:
                pipe.zrangebyscore(self.keys.outbox(tenant), "-inf", before, start=0, num=BATCH)
            waiting = await pipe.execute()
        handed = 0
        for tenant, members in zip(self.tenants, waiting, strict=True):
            for member in members:
                handed += await self._resend(tenant, member.decode())
        self.swept += handed
        return handed

    async def _resend(self, tenant: str, arq_id: str) -> int:
        job_id = arq_id.rsplit(".", 1)[0]
        status, current, priority = await self.store.redis.hmget(  # type: ignore[misc]
            self.keys.job(tenant, job_id), ["status", "arq_id", "priority"]
        )
        handed = 0
        if status == b"queued" and current == arq_id.encode():
            priority = (priority or b"normal").decode()
            enqueue = self.queue.prepare(arq_id, job_id, priority=priority, tenant=tenant)
            handed = int(await self.queue.hand_over(enqueue, self.keys.outbox(tenant)))
            if handed:
                logger.warning("job %s: its first attempt was left in the outbox; queued", job_id)
        else:  # its job moved on (started, cancelled, re-run) or is gone
            await self.store.redis.zrem(self.keys.outbox(tenant), arq_id)
        return handed

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.grace_s)
            try:
                await self.sweep()
            except (RedisError, OSError) as exc:
                logger.warning("the outbox sweep failed (%s); trying again", exc)
