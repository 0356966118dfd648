"""The only module that knows arq: JSON serialization, enqueue, abort, the worker.

arq is in maintenance-only mode upstream, so it stays behind this boundary. pushsvc
uses it as a delayed queue: every attempt of a job is its own arq job, and attempts,
retries and crash recovery are pushsvc's (see worker.py). arq makes a delivery again only
when the worker asks (:func:`deliver_again`: the job's state was unreachable before the
attempt started), up to ``MAX_DELIVERIES`` times; a delivery of an attempt that is not
queued any more does nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from arq.connections import ArqRedis
from arq.constants import (
    abort_jobs_ss,
    expires_extra_ms,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from arq.worker import Retry, Worker, func

from .connections import make_pool
from .keys import Keys
from .settings import Settings

RUN_FUNCTION = "pushsvc.run"
# Deliveries of one arq job (arq's job_try): every try of an attempt whose job state was
# unreachable, and every delivery after a worker stopped mid-run (then a no-op). With the
# worker's pauses before each (at most 8 s, 4 to 8 once past the first few), over an hour
# of a job state unreachable.
MAX_DELIVERIES = 1000
ABORT_KEEP_MS = 3_600_000


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
    """arq's job_serializer: JSON (arq's default would not be)."""
    return json.dumps(obj, default=_default, separators=(",", ":")).encode()


def deserialize(data: bytes) -> Any:
    return json.loads(data, object_hook=_object_hook)


def connect(settings: Settings, max_connections: int | None = None, **pool_kwargs: Any) -> ArqRedis:
    """A lazily connecting client (arq's enqueue on top of redis-py's asyncio client);
    see :func:`pushsvc.connections.make_pool`."""
    pool = make_pool(settings, max_connections, **pool_kwargs)
    client = ArqRedis(
        pool,
        job_serializer=serialize,
        job_deserializer=deserialize,
        default_queue_name=Keys(settings.namespace).queue,
    )
    client.auto_close_connection_pool = True  # the client owns its pool: closed with it
    return client


def record_key(arq_id: str) -> str:
    """Where arq keeps an attempt's record (its enqueue time ``et``, among others)."""
    return job_key_prefix + arq_id


def new_arq_id(job_id: str) -> str:
    """The arq id of a new attempt of ``job_id``: ``<job id>.<random>`` (the job's ``arq_id``)."""
    return f"{job_id}.{secrets.token_hex(4)}"


@dataclass(frozen=True)
class Enqueue:
    """An arq job record and its place, ready to hand over (lua/enqueue.lua).

    ``target`` is arq's queue (``member`` the arq id; its place, a turn, is taken by the
    script: ``score`` None) or, for an attempt that must wait, pushsvc's delayed set
    (``score`` the due time, ``member`` "<priority>|<arq id>|<turn owner>").
    ``turn_slot``: how far one attempt moves its owner's turn (fair share, below).
    """

    key: str
    payload: bytes
    px: int
    target: str
    score: int | None
    member: str
    arq_id: str
    priority: str = "normal"
    turn_owner: str = "*"
    turn_slot: int = 1000
    defer_ms: int = 0  # how long it waits before arq may start it


# Fair share. arq reads its queue in score order, so the order is the schedule. An
# attempt's score is its *turn* minus its priority class's base: every ready high
# attempt sorts before every normal one, and so on, and every score is far below now
# (always ready). Within a class, turns are start-time fair queueing over tenants: a
# tenant's next attempt takes the turn after its last one (one ``TURN`` further, less
# for a heavier weight), but never earlier than the turn of the attempt that started
# last in the class (the class's clock). So a tenant with 3,000 queued holds turns far
# ahead, and another tenant's one job takes the clock's turn: it starts next, not
# 3,000th. A tenant alone in the queue is first in, first out. The script takes the
# turn (lua/turns_fn.lua ``turn_score``) in the same call that queues (enqueue.lua,
# move.lua); a start moves the clock (started.lua, the worker's call).
TURN = 1000
STARTS_TTL_S = 900  # a start counter (Keys.starts) outlives the longest rate window (600 s)
CLASS_BASE = {"high": 3 * 10**15, "normal": 2 * 10**15, "low": 10**15}
ALL_TENANTS = "*"  # the one turn owner when fair share is off: first in, first out


def turn_owner(tenant: str, settings: Settings) -> str:
    """Whose line an attempt of ``tenant`` waits in: the tenant's own, or with fair share
    off, the one line of every tenant."""
    return tenant if settings.fair_share else ALL_TENANTS


def turn_slot(tenant: str, settings: Settings) -> int:
    """How far one attempt moves its owner's turn: less for a heavier weight."""
    return max(1, round(TURN / settings.tenant_weights.get(tenant, 1.0)))


# arq's line as an attempt starts (arq/worker.py, ``run_job``): the seconds since it was
# enqueued, the job, its arguments, and `` delayed=<start - score>s`` when that passes
# 1.2 s. Our scores are turns far below any time (fair share above), so every attempt
# read ``delayed=2000001765000000.05s``: the line's first figure (since enqueued) is
# the true wait, and the ``delayed=`` part is dropped.
ARQ_START_LINE = "%6.2fs → %s(%s)%s"
_DELAYED = re.compile(r" delayed=[0-9]+(?:\.[0-9]+)?s")


class ArqDelayFilter(logging.Filter):
    """Drops the meaningless ``delayed=`` from arq's start line. arq is frozen upstream:
    its line is mended, not its code."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if record.msg != ARQ_START_LINE or not isinstance(args, tuple) or len(args) != 4:
            return True
        extra = str(args[3])
        if _DELAYED.search(extra):
            record.args = (*args[:3], _DELAYED.sub("", extra))
        return True


def _mend_arq_log() -> None:
    arq_log = logging.getLogger("arq.worker")
    if not any(isinstance(f, ArqDelayFilter) for f in arq_log.filters):
        arq_log.addFilter(ArqDelayFilter())


# arq's mark of a delivery under way, dropped when the attempt holds no lease (KEYS: the
# mark, the leases; ARGV: the arq id); 1 when dropped.
_UNMARK = """
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
return redis.call('DEL', KEYS[1])
"""


class Queue:
    """Prepares, hands over and aborts attempts (the store hands over what ``prepare``
    makes, after the change that queued it: store.py, outbox.py)."""

    def __init__(self, redis: ArqRedis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.queue_name = self.keys.queue
        lua = resources.files(__package__) / "lua"
        turns = (lua / "turns_fn.lua").read_text()
        self._move = redis.register_script(turns + (lua / "move.lua").read_text())
        self._enqueue = redis.register_script(turns + (lua / "enqueue.lua").read_text())
        self._started = redis.register_script(turns + (lua / "started.lua").read_text())
        self._unmark = redis.register_script(_UNMARK)

    def prepare(
        self,
        arq_id: str,
        job_id: str,
        defer_s: float = 0.0,
        priority: str = "normal",
        *,
        tenant: str,
    ) -> Enqueue:
        """What ``ArqRedis.enqueue_job`` would write, to hand over (:meth:`hand_over`).

        A deferred attempt goes to the delayed set, not to arq: arq's scores are turns,
        not times; :meth:`move_due` gives it a turn when it is due.
        """
        now_ms = timestamp_ms()
        defer_ms = int(defer_s * 1000)
        owner, slot = turn_owner(tenant, self.settings), turn_slot(tenant, self.settings)
        args = (job_id, tenant)
        payload = serialize_job(RUN_FUNCTION, args, {}, None, now_ms, serializer=serialize)
        key, px = job_key_prefix + arq_id, defer_ms + expires_extra_ms
        if defer_ms > 0:
            member, due = f"{priority}|{arq_id}|{owner}", now_ms + defer_ms
            target: tuple[str, int | None, str] = (self.keys.delayed, due, member)
        else:
            target = (self.queue_name, None, arq_id)
        return Enqueue(key, payload, px, *target, arq_id, priority, owner, slot, defer_ms)

    async def move_due(self, limit: int = 500) -> int:
        """Hand attempts whose wait is over to arq, each taking its owner's next turn."""
        keys = [self.keys.delayed, self.queue_name, self.keys.turns]
        args: list[str | int] = [timestamp_ms(), limit, self.keys.tenant_turns(""), TURN]
        for tenant in self.settings.tenant_weights if self.settings.fair_share else ():
            args += [tenant, turn_slot(tenant, self.settings)]
        return int(await self._move(keys=keys, args=args))

    async def abort(self, arq_id: str) -> None:
        """Ask arq to cancel the attempt: dropped before it starts, or its task cancelled."""
        now_ms = timestamp_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(abort_jobs_ss, {arq_id: now_ms})
            # arq removes entries only for attempts it sees; drop the ones it never will.
            pipe.zremrangebyscore(abort_jobs_ss, 0, now_ms - ABORT_KEEP_MS)
            await pipe.execute()

    async def hand_over(self, enq: Enqueue, outbox: tuple[str, str] | None = None) -> bool:
        """Queue an attempt in arq (lua/enqueue.lua), unless arq holds it already (its
        record: queued or running); False then. With ``outbox`` (its key and the job's
        hash, both on this Redis), also unless the job no longer waits for the attempt,
        which leaves the outbox in the same call. Safe to repeat (outbox.py)."""
        owner_line = self.keys.tenant_turns(enq.turn_owner)
        keys = [enq.key, result_key_prefix + enq.arq_id, enq.target, self.keys.turns, owner_line]
        keys += [self.queue_name, *(outbox or ())]
        score = "" if enq.score is None else enq.score
        args: list[bytes | str | int] = [enq.payload, enq.px, score, enq.member]
        args += [enq.priority, enq.turn_slot, enq.arq_id]
        return bool(await self._enqueue(keys=keys, args=args))

    async def started(self, arq_id: str, priority: str, tenant: str) -> None:
        """An attempt started (lua/started.lua): its class's clock moves up to its turn,
        and the start is counted (the start rate of places in line: line.py). Its own
        call, after the start transition (job state and the queue are two planes); a
        start whose call is lost leaves the clock behind until the next, and the rate a
        little low."""
        owner_line = self.keys.tenant_turns(turn_owner(tenant, self.settings))
        counter = self.keys.starts(int(time.time()))
        keys = [self.keys.turns, self.queue_name, owner_line, counter]
        await self._started(keys=keys, args=[priority, arq_id, STARTS_TTL_S])

    async def unmark_picked(self, arq_id: str) -> bool:
        """After the queue's Redis lost writes: arq's mark that a worker picked the
        attempt, where the attempt holds no lease and its job still waits, queued, for
        it, was restored from a history whose start was lost (a snapshot taken between
        the pick and the start). arq would deliver it again only once the mark expires
        (the longest job timeout and more): it goes, and arq delivers the attempt now.
        A delivery under way that has not taken its lease yet (it takes it before its
        start) is then made twice; the start lets one through (worker.py). True when it
        went."""
        keys = [in_progress_key_prefix + arq_id, self.keys.leases]
        return bool(await self._unmark(keys=keys, args=[arq_id]))

    async def tenant_of(self, arq_id: str) -> str | None:
        """The tenant an attempt's arq job names (its arguments: job id, tenant), while
        arq keeps it; None for one it no longer keeps, or one queued before it named it."""
        record = await self.redis.get(record_key(arq_id))
        if record is None:
            return None
        args = deserialize(record).get("a") or []
        return str(args[1]) if len(args) > 1 else None

    async def forget(self, arq_id: str, priority: str, tenant: str) -> None:
        """Drop an attempt that will never run (cancelled while queued, or its worker
        died) from arq's queue and pushsvc's delayed set; else it would stay counted."""
        owner = turn_owner(tenant, self.settings)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self.queue_name, arq_id)
            pipe.zrem(self.keys.delayed, f"{priority}|{arq_id}|{owner}")
            pipe.delete(
                job_key_prefix + arq_id,
                in_progress_key_prefix + arq_id,
                retry_key_prefix + arq_id,
            )
            await pipe.execute()


def deliver_again() -> Retry:
    """What a run raises for arq to deliver its arq job again, in its turn: no delay
    (arq's would give it a score of a time, which the mover takes for an old arq job's
    and re-queues at once, out of its class and turn; the run waits instead)."""
    return Retry()


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
    _mend_arq_log()
    return Worker(
        functions=[
            # pushsvc enforces each type's timeout itself; arq's is a backstop above it.
            func(
                run,
                name=RUN_FUNCTION,
                max_tries=MAX_DELIVERIES,
                keep_result=0,
                timeout=max_timeout_s + 30,
            )
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
