"""New jobs' first attempts, from the job store to arq's queue: the mover hands each
over as its job is made; the sweeper hands over those a crash left behind.

Job state and the queue are two planes: on a Redis Cluster the first cannot share a
script with arq's keys, so making a job and queueing its first attempt are two calls.
The job is made with the attempt in its tenant's outbox (lua/create.lua, which also
lists the tenant in ``keys.tenants``); the API hands the attempt to arq at once
(``Queue.hand_over``) and it leaves the outbox. An API process that dies in between
leaves it there, and so does a Redis error between the two calls: every API process
sweeps every listed outbox every ``outbox_sweep_s`` and hands over what has waited
longer than that while its job still waits for it. So no job stays queued for ever.
None runs twice: a hand-over is refused while arq holds the attempt or once its job no
longer waits for it (checked in the same call while both are on one Redis), and a
worker starts an attempt only while its job is queued for it (the start transition).
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from .queue import Enqueue, Queue
from .store import JobStore

logger = logging.getLogger(__name__)

BATCH = 500  # attempts one sweep takes from one tenant's outbox


class Outbox:
    """Hands the tenants' new attempts to arq (see the module's docstring)."""

    def __init__(self, store: JobStore, queue: Queue) -> None:
        self.store, self.queue, self.keys = store, queue, store.keys
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

    def _plane(self, tenant: str, job_id: str) -> tuple[str, str]:
        """The outbox and the job's hash, for a hand-over on the same Redis."""
        return self.keys.outbox(tenant), self.keys.job(tenant, job_id)

    async def move(self, tenant: str, job_id: str, enqueue: Enqueue) -> None:
        """Hand a new job's first attempt to arq; it leaves the outbox in the same call
        while both are on one Redis (with two planes: two calls, the hand-over first)."""
        await self.queue.hand_over(enqueue, self._plane(tenant, job_id))

    async def sweep(self) -> int:
        """Hand over the attempts that waited in an outbox longer than the grace (by
        Redis's clock, which wrote them); how many. Those whose job no longer waits for
        them (started, cancelled, gone) just leave the outbox. A tenant whose outbox
        cannot be read is tried again at the next sweep; the others go on."""
        seconds, micros = await self.store.redis.time()
        before = int((seconds + micros / 1e6 - self.grace_s) * 1000)
        handed = 0
        for raw in await self.store.redis.smembers(self.keys.tenants):  # type: ignore[misc]
            tenant = raw.decode()
            try:
                handed += await self._sweep_one(tenant, before)
            except RedisError as exc:
                logger.warning("the outbox of tenant %s was not swept (%s)", tenant, exc)
        self.swept += handed
        return handed

    async def _sweep_one(self, tenant: str, before: int) -> int:
        outbox = self.keys.outbox(tenant)
        members = await self.store.redis.zrangebyscore(outbox, "-inf", before, start=0, num=BATCH)
        arq_ids = [m.decode() for m in members]
        job_ids = [arq_id.rsplit(".", 1)[0] for arq_id in arq_ids]
        async with self.store.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self.keys.job(tenant, job_id), "priority")
            priorities = await pipe.execute()
        handed = 0
        for arq_id, job_id, priority in zip(arq_ids, job_ids, priorities, strict=True):
            prio = (priority or b"normal").decode()
            enqueue = self.queue.prepare(arq_id, job_id, priority=prio, tenant=tenant)
            if await self.queue.hand_over(enqueue, self._plane(tenant, job_id)):
                logger.warning("job %s: its first attempt was left in the outbox; queued", job_id)
                handed += 1
        return handed

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.grace_s)
            try:
                await self.sweep()
            except Exception:  # the sweeper lives on: a job left behind waits for it
                logger.exception("the outbox sweep failed; trying again")
