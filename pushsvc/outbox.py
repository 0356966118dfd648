"""Attempts from the job store to arq's queue: each is handed over as the change that
queues it is made; the sweeper hands over those a crash left behind.

Job state and the queue are two planes: on a Redis Cluster the first cannot share a
script with arq's keys, so changing a job and queueing its attempt are two calls. The
change (a new job: lua/create.lua, which also lists the tenant in ``keys.tenants``; a
retry, a re-run, a throttled start: lua/publish_fn.lua) puts the attempt in its
tenant's outbox, scored by Redis's time plus its delay; its caller hands it to arq at
once (``JobStore.hand_over``) and it leaves the outbox. A process that dies in between
leaves it there, and so does a Redis error between the two calls: every API process
sweeps every listed outbox every ``outbox_sweep_s`` and hands over what is due and has
waited longer than that while its job still waits for it. So no job stays queued for
ever. None runs twice: a hand-over is refused while arq holds the attempt or once its
job no longer waits for it (checked in the same call while both are on one Redis), and
a worker starts an attempt only while its job is queued for it (the start transition).
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.exceptions import RedisError

from .queue import Queue
from .store import JobStore

logger = logging.getLogger(__name__)

BATCH = 500  # attempts one sweep takes from one tenant's outbox (and jobs, its index)
RECOVERED_RECENTLY_S = 600  # a recovery of the queue this recent is handled at start
MAX_SCORE = 1 << 62  # above any index score (creation times in ms)
QUEUED = ("queued", "")  # the index scan's filter: queued jobs of any type


class Outbox:
    """Hands the tenants' new attempts to arq (see the module's docstring)."""

    def __init__(self, store: JobStore, queue: Queue) -> None:
        self.store, self.queue, self.keys = store, queue, store.keys
        self.grace_s = store.settings.outbox_sweep_s
        self.swept = 0  # attempts the sweeper handed over (a crash or an error left them)
        self._recovered: bytes | None = None  # the queue's last recovery handled
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Outbox:
        self._task = asyncio.create_task(self._run(), name="pushsvc-outbox")
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def sweep(self) -> int:
        """Hand over the attempts that waited in an outbox longer than the grace (by
        Redis's clock, which wrote them); how many. Those whose job no longer waits for
        them (started, cancelled, gone) just leave the outbox. A tenant whose outbox
        cannot be read is tried again at the next sweep; the others go on."""
        seconds, micros = await self.store.redis.time()
        before = int((seconds + micros / 1e6 - self.grace_s) * 1000)
        handed = 0
        for tenant in await self.tenants():
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
            # A Redis error ends this tenant's sweep.
            if await self.store.hand_over_now(tenant, job_id, enqueue):
                logger.warning("job %s: an attempt was left in the outbox; queued", job_id)
                handed += 1
        return handed

    async def tenants(self) -> list[str]:
        raw = await self.store.redis.smembers(self.keys.tenants)  # type: ignore[misc]
        return sorted(t.decode() for t in raw)

    async def requeue_lost(self) -> int:
        """After the queue's Redis lost what it held (it came back empty or from an older
        snapshot, or failed over losing writes: its store-wide epoch was taken anew,
        epoch.py), for every queued job: with job state on another Redis (two planes),
        hand over again its attempt, which arq may no longer hold (a hand-over is a
        no-op for one it holds; a deferred retry is then queued without its wait); on
        one Redis or two, drop arq's mark that a worker picked it, where the attempt
        holds no lease (``Queue.unmark_picked``: a pick restored without its start).
        How many it queued or unmarked."""
        epoch = self.keys.epoch
        recovered, at = await self.queue.redis.hmget(epoch, ["recovered", "recovered_at"])  # type: ignore[misc]
        if recovered is None or recovered == self._recovered:
            return 0
        if self._recovered is None and time.time() - int(at or 0) > RECOVERED_RECENTLY_S:
            self._recovered = recovered
            return 0  # handled before this process started
        handed = 0
        for tenant in await self.tenants():
            handed += await self._requeue_tenant(tenant)
        self._recovered = recovered  # a pass a Redis error cut is made again, whole
        logger.warning(
            "the queue's Redis lost writes: %d queued attempts queued or unmarked", handed
        )
        return handed

    async def _requeue_tenant(self, tenant: str) -> int:
        handed = offset = 0
        while True:
            window = (offset, BATCH)
            scanned, queued, _ = await self.store.scan_index(tenant, MAX_SCORE, window, QUEUED)
            for job_id, _score in queued:
                fields = await self.store.load(tenant, job_id)
                if fields is None or fields.get("status") != "queued" or not fields.get("arq_id"):
                    continue
                arq_id = fields["arq_id"]
                if not self.store.one_plane:
                    prio = fields.get("priority") or "normal"
                    enqueue = self.queue.prepare(arq_id, job_id, priority=prio, tenant=tenant)
                    handed += await self.store.hand_over_now(tenant, job_id, enqueue)
                handed += await self.queue.unmark_picked(arq_id)
            if scanned < BATCH:
                return handed
            offset += scanned

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.grace_s)
            try:
                await self.requeue_lost()
                await self.sweep()
            except Exception:  # the sweeper lives on: a job left behind waits for it
                logger.exception("the outbox sweep failed; trying again")
