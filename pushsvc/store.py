"""Job state in Redis: the publish scripts run (Lua), snapshots, heads and event logs."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple, cast

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from .batching import ScriptBatch
from .data_plane import DataCluster, settled, transaction
from .epoch import StreamPosition, new_epoch, run_id_arg
from .fields import EVENT_EXCLUDE, decode_fields, to_snapshot
from .frames import Frame
from .keys import Keys
from .models import JobSnapshot, JobStatus
from .publish import Diverged, Event, PublishCall, Published, Rejected, Reply, Throttled, Writer
from .queue import Enqueue, Queue
from .settings import Settings

logger = logging.getLogger(__name__)


def _lua(name: str) -> str:
    return (resources.files(__package__) / "lua" / name).read_text()


@dataclass(frozen=True)
class JobHead:
    """Whose a job is and where it stands: what a stream endpoint checks before it streams
    (reading the snapshot would read all its output, megabytes for some jobs)."""

    tenant: str
    status: JobStatus
    position: StreamPosition


class Created(NamedTuple):
    """What ``JobStore.create`` did."""

    job_id: str
    earlier_fingerprint: str | None  # set when the idempotency key was used before
    epoch: str = ""  # the new job's first event's


class JobStore:
    """Reads and writes job state; every write goes through one Lua publish path."""

    def __init__(
        self,
        redis: Redis | DataCluster,
        settings: Settings,
        *,
        batched: bool = False,
        queue: Queue | None = None,
    ) -> None:
        """``redis``: the data plane's client; ``queue``: the queue plane's (the same Redis
        when not given). ``batched``: publish calls made in the same turn of the event
        loop go to Redis in one pipeline (a worker's many jobs flushing:
        ``batching.ScriptBatch``)."""
        # The cluster client has the commands used here (and runs scripts by a key's slot).
        self.redis = cast(Redis, redis)
        self.settings = settings
        self.keys = Keys(settings.namespace)
        fn = _lua("publish_fn.lua")
        if isinstance(redis, DataCluster):  # each event goes to its slot's shard only
            fn = fn.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
        self._publish = self.redis.register_script(fn + _lua("publish.lua"))
        self._create = self.redis.register_script(fn + _lua("create.lua"))
        self._repair = self.redis.register_script(fn + _lua("repair.lua"))
        self._read = self.redis.register_script(_lua("read.lua"))
        self._scan = self.redis.register_script(_lua("scan.lua"))
        self._grace = self.redis.register_script(_lua("grace.lua"))
        self._batch = ScriptBatch(self.redis, self._publish) if batched else None
        # The queue plane, where attempts waiting in an outbox are handed over, and the
        # keys without a tenant's tag (whose a job is, the tenants): this Redis while
        # job state and the queue are one.
        self.queue = queue or Queue(self.redis, settings)  # type: ignore[arg-type]
        self.one_plane = self.queue.redis is self.redis
        self.published = 0  # events this process published (a worker's metric)

    async def create(
        self, tenant: str, fields: dict[str, Any], idem: tuple[str, str] | None
    ) -> Created:
        """Store a new job and publish its first event (a ``snapshot``), at once; its first
        attempt (``fields["arq_id"]``) waits in the tenant's outbox for outbox.py to hand
        it to arq.

        ``idem`` is (key, request fingerprint). Returns the new job's id and epoch, or the
        earlier job's id and fingerprint when the idempotency key was used before.
        """
        job_id = fields["id"]
        call = PublishCall(
            job_id,
            tenant,
            "snapshot",
            to_snapshot(fields).model_dump(mode="json", exclude=EVENT_EXCLUDE),
            fields,
            fingerprint=idem[1] if idem else "",
            index_score=int(fields["created_at"] * 1000),
        )
        keys, args = call.layout(self.keys, self.settings, run_id_arg(self.redis))
        index = self.keys.tenant_index(tenant)
        keys += [index, idem[0] if idem else index]
        try:
            created, found = await self._listed_create(tenant, job_id, keys, args)
        except NoScriptError:  # a Redis that restarted or was flushed: load it, once more
            await self.redis.script_load(self._create.script)
            created, found = await self._listed_create(tenant, job_id, keys, args)
        if created:
            return Created(job_id, None, found.decode())
        with contextlib.suppress(RedisError):  # a replay: no such job (else it expires)
            await self.queue.redis.delete(self.keys.job_tenant(job_id))
        earlier, _, fingerprint = found.decode().partition(" ")
        return Created(earlier, fingerprint)

    async def _listed_create(
        self, tenant: str, job_id: str, keys: list[str], args: list[Any]
    ) -> list[Any]:
        """Whose the job is and the tenant's listing, then the creation script, in one
        round trip (not the tenant's slot, they are calls of their own on a cluster);
        written first, a crash after them leaves no job unlisted."""
        if not self.one_plane:  # two planes: two round trips
            await self.remember_tenant(tenant, job_id)
            return await self._create(keys=keys, args=args)  # type: ignore[no-any-return]
        async with self.redis.pipeline(transaction=False) as pipe:
            self._list(pipe, tenant, job_id)
            pipe.execute_command("EVALSHA", self._create.sha, len(keys), *keys, *args)
            reply: list[Any] = (await pipe.execute())[-1]
        return reply

    async def publish(
        self,
        job_id: str,
        tenant: str,
        kind: str,
        data: dict[str, Any],
        fields: dict[str, Any] | None = None,
        *,
        expect: tuple[JobStatus, ...] = (),
        delta: str = "",
        writer: Writer | None = None,
        enqueue: Enqueue | None = None,
        max_running: int | None = None,
        then: Event | None = None,
    ) -> Reply:
        """Apply ``fields``, append ``delta`` and publish one event (and ``then``, a second
        one), atomically.

        Nothing happens unless the job's status is in ``expect`` (when given) and it is
        still ``writer``'s attempt (when given). ``enqueue``, the attempt the change queues,
        waits in the tenant's outbox and is handed to arq right after (:meth:`hand_over`).
        (Leases are the worker's own calls: leases.py.)
        With ``max_running``, a tenant already running that many jobs gets ``Throttled``
        and ``enqueue`` (the attempt's later slot) is stored instead of any change.
        Returns None for an unknown (or expired, or lost) job.
        """
        call = PublishCall(
            job_id,
            tenant,
            kind,
            data,
            fields or {},
            expect=expect,
            delta=delta,
            writer=writer,
            enqueue=enqueue,
            max_running=max_running,
            then=then,
        )
        reply = await self.send(call)
        if enqueue is not None and isinstance(reply, Published | Throttled):
            await self.hand_over(tenant, job_id, enqueue)
        return reply

    async def hand_over(self, tenant: str, job_id: str, enqueue: Enqueue) -> bool:
        """Hand an attempt waiting in the tenant's outbox to arq (``Queue.hand_over``; it
        leaves the outbox in the same call while both are one Redis). False: not now (arq
        has it, its job no longer waits for it, or Redis failed: logged, and the outbox's
        sweeper hands it over later; outbox.py)."""
        try:
            return await self.hand_over_now(tenant, job_id, enqueue)
        except (RedisError, OSError) as exc:
            logger.warning(
                "job %s: not handed to the queue yet (%s); the outbox has it", job_id, exc
            )
            return False

    async def hand_over_now(self, tenant: str, job_id: str, enqueue: Enqueue) -> bool:
        """:meth:`hand_over`, its Redis errors raised (the sweeper's: outbox.py).

        On two planes, three calls, each safe to repeat: is the attempt still the one
        its job waits for (the data plane), hand it over (the queue: arq's record makes
        a second hand-over a no-op), then it leaves the outbox. A crash between them
        leaves the entry, and the sweeper makes the same calls again."""
        outbox = self.keys.outbox(tenant)
        job = self.keys.job(tenant, job_id)
        if self.one_plane:  # one script, the outbox entry leaving in it
            return await self.queue.hand_over(enqueue, (outbox, job))
        status, arq_id = await self.redis.hmget(job, ["status", "arq_id"])  # type: ignore[misc]
        waits = status == b"queued" and arq_id == enqueue.arq_id.encode()
        handed = waits and await self.queue.hand_over(enqueue)
        await self.redis.zrem(outbox, enqueue.arq_id)
        return handed

    async def send(self, call: PublishCall) -> Reply:
        """Run one publish call (see :meth:`publish`)."""
        keys, args = call.layout(self.keys, self.settings, run_id_arg(self.redis))
        if self._batch is not None:
            reply = await self._batch(keys, args)
        else:
            reply = await self._publish(keys=keys, args=args)
        return self._reply(reply, events=1 if call.then is None else 2)

    async def repair(self, call: PublishCall) -> Reply:
        """Rewrite a job its worker holds (lua/repair.lua): ``Published`` under a fresh
        epoch, or ``Rejected`` when the attempt is no longer the writer's."""
        await self.remember_tenant(call.tenant, call.job_id)  # it may be lost with the job
        keys, args = call.layout(self.keys, self.settings, run_id_arg(self.redis))
        keys.append(self.keys.tenant_index(call.tenant))
        return self._reply(await self._repair(keys=keys, args=args))

    def _reply(self, reply: list[Any], events: int = 1) -> Reply:
        code = reply[0]
        if code > 0:
            self.published += events
            return Published(
                int(code), JobStatus(reply[1].decode()), reply[2] == b"1", reply[3].decode()
            )
        if code == -1:
            return None
        if code == -2:
            return Throttled()
        if code == -3:
            position = StreamPosition(int(reply[2] or 0), reply[3].decode())
            return Diverged(JobStatus(reply[1].decode()), position)
        return Rejected(JobStatus(reply[1].decode()))

    async def load(self, tenant: str, job_id: str) -> dict[str, Any] | None:
        """All stored fields of the tenant's job (payload and arq id included), or None."""
        key = self.keys.job(tenant, job_id)
        output_key = self.keys.job_output(tenant, job_id)
        raw, output = await transaction(
            self.redis, key, lambda p: (p.hgetall(key), p.get(output_key))
        )
        return decode_fields(raw, output) if raw else None

    async def remember_tenant(self, tenant: str, job_id: str) -> None:
        """Note whose the job is, and list the tenant again (a Redis that came back empty
        forgot both)."""
        async with self.queue.redis.pipeline(transaction=False) as pipe:
            self._list(pipe, tenant, job_id, tenants=self.one_plane)
            await pipe.execute()
        if not self.one_plane:  # the tenants are the data plane's
            await self.redis.sadd(self.keys.tenants, tenant)  # type: ignore[misc]

    def _list(self, pipe: Any, tenant: str, job_id: str, *, tenants: bool = True) -> None:
        """Whose the job is (keys.job_tenant: the queue plane's), for as long as a job is
        kept, for readers that know only its id; and (``tenants``) the tenant in
        keys.tenants (the data plane's: it lists whose job state there is), whose
        outboxes, queued jobs and stats are read."""
        pipe.set(self.keys.job_tenant(job_id), tenant, ex=self.settings.job_ttl_s)
        if tenants:
            pipe.sadd(self.keys.tenants, tenant)

    async def tenants_of(self, job_ids: list[str]) -> list[str | None]:
        """Whose each job is (None: unknown, or expired), for readers that know only ids."""
        if not job_ids:
            return []
        names = await self.queue.redis.mget([self.keys.job_tenant(j) for j in job_ids])
        return [n.decode() if n is not None else None for n in names]

    async def load_by_id(self, job_id: str) -> dict[str, Any] | None:
        """:meth:`load` of a job whose tenant the caller does not know (the lease reaper)."""
        (tenant,) = await self.tenants_of([job_id])
        return None if tenant is None else await self.load(tenant, job_id)

    async def load_many(self, tenant: str, job_ids: list[str]) -> list[dict[str, Any] | None]:
        """:meth:`load` of several of the tenant's jobs in one round trip."""

        def build(pipe: Any) -> None:
            for job_id in job_ids:
                pipe.hgetall(self.keys.job(tenant, job_id))
                pipe.get(self.keys.job_output(tenant, job_id))

        replies = await transaction(self.redis, self.keys.tenant_tag(tenant), build)
        return [
            decode_fields(raw, output) if raw else None
            for raw, output in zip(replies[::2], replies[1::2], strict=True)
        ]

    async def scan_index(
        self, tenant: str, max_score: int, window: tuple[int, int], filters: tuple[str, str]
    ) -> tuple[int, list[tuple[str, int]], list[str]]:
        """One batch of the tenant's index, newest first (lua/scan.lua): how many entries of
        ``window`` (offset, count) there were, those whose job matches ``filters`` (status,
        type; '' matches any) as (id, score), and the ids of jobs gone."""
        args: list[str | int] = [self.keys.job(tenant, ""), max_score, *window, *filters]
        index = [self.keys.tenant_index(tenant)]
        # It reads job keys it is not given: while the slot moves, one may be elsewhere.
        scanned, matches, gone = await settled(
            lambda: self._scan(keys=index, args=args), reads_only=True
        )
        ids, scores = matches[::2], matches[1::2]
        found = [(m.decode(), int(float(s))) for m, s in zip(ids, scores, strict=True)]
        return int(scanned), found, [g.decode() for g in gone]

    async def heads(
        self, tenant: str, job_ids: list[str]
    ) -> tuple[StreamPosition, dict[str, JobHead | None]]:
        """Atomically: the tenant's position and each job's head (None: unknown)."""

        def build(pipe: Any) -> None:
            pipe.hmget(self.keys.tenant_position(tenant), ["seq", "epoch"])
            for job_id in job_ids:
                pipe.hmget(self.keys.job(tenant, job_id), ["tenant", "status", "seq", "epoch"])

        (tseq, tepoch), *rows = await transaction(self.redis, self.keys.tenant_tag(tenant), build)
        heads: dict[str, JobHead | None] = {}
        for job_id, (owner, status, seq, epoch) in zip(job_ids, rows, strict=True):
            heads[job_id] = None
            if owner is not None and status is not None:
                position = StreamPosition(int(seq or 0), (epoch or b"").decode())
                heads[job_id] = JobHead(owner.decode(), JobStatus(status.decode()), position)
        return StreamPosition(int(tseq or 0), (tepoch or b"").decode()), heads

    async def load_with_last(
        self, tenant: str, job_id: str
    ) -> tuple[dict[str, Any], Frame | None] | None:
        """:meth:`load` and the job's last logged event, read together."""
        key = self.keys.job(tenant, job_id)
        output_key, log = self.keys.job_output(tenant, job_id), self.keys.job_log(tenant, job_id)
        raw, output, entries = await transaction(
            self.redis,
            key,
            lambda p: (p.hgetall(key), p.get(output_key), p.xrevrange(log, "+", "-", count=1)),
        )
        if not raw:
            return None
        return decode_fields(raw, output), _last_frame(job_id, entries)

    async def recovering(self, tenant: str) -> bool:
        """Did the store (on a cluster: the tenant's shard) start a new epoch (a restart,
        a failover, an empty Redis) less than ``state_lost_grace_s`` ago? Then a missing
        job may still be repaired by the worker running it: it is not known to be gone
        yet."""
        left = await self.grace_left(tenant)
        return left is not None and left > 0

    async def new_histories(self, tenant: str) -> None:
        """Start new histories for the tenant at its next write, as after a failover
        (its epoch forgets the server it was taken on: lua/publish_fn.lua): for a loss
        the epochs did not see, whose positions streams may hold."""
        await self.redis.hdel(self.keys.tenant_epoch(tenant), "run")  # type: ignore[misc]

    async def grace_left(self, tenant: str) -> float | None:
        """Seconds left of the grace that the store's last recovery gives missing jobs
        (0 once it is over); None for a store no process knew before (a new deployment,
        not a loss), or when no recovery was recorded yet. On a cluster, the tenant's
        shard's last failover or restart with data (lua/grace.lua: the store-wide epoch
        is one Redis's; a shard that came back empty is a new tenant's to it)."""
        if isinstance(self.redis, DataCluster):
            key = self.keys.tenant_epoch(tenant)
            args = [run_id_arg(self.redis), new_epoch()]
            since = int(await self._grace(keys=[key], args=args))
            return None if since < 0 else max(0.0, self.settings.state_lost_grace_s - since)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.epoch, ["id", "recovered", "recovered_at"])
            pipe.time()
            (epoch, recovered, since), (now, micros) = await pipe.execute()
        if since is None or recovered != epoch:
            return None
        elapsed = now + micros / 1e6 - int(since)
        return max(0.0, float(self.settings.state_lost_grace_s - elapsed))

    async def snapshot(self, job_id: str, tenant: str) -> JobSnapshot | None:
        """The tenant's job, or None when it is unknown or belongs to another tenant."""
        fields = await self.load(tenant, job_id)
        if fields is None or fields.get("tenant") != tenant:
            return None
        return to_snapshot(fields)

    async def events_after(
        self, tenant: str, job_id: str, after: StreamPosition, limit: int | None = None
    ) -> tuple[list[Frame], str] | None:
        """The job's logged events after ``after`` (the first ``limit``) and the job's
        epoch, or None when the log cannot continue from there: another epoch, a seq the
        store does not hold (ahead of it: history was rewound), or events no longer kept."""
        key = self.keys.job(tenant, job_id)
        log, start = self.keys.job_log(tenant, job_id), f"({_sid(after.seq)}"
        entries, (seq_b, epoch_b) = await transaction(
            self.redis,
            key,
            lambda p: (p.xrange(log, start, "+", count=limit), p.hmget(key, ["seq", "epoch"])),
        )
        epoch = (epoch_b or b"").decode()
        if not _continues(after, entries, int(seq_b or 0), epoch):
            return None
        frames = [
            Frame(int(f[b"t"]), _seq_of(eid), f[b"k"].decode(), job_id, f[b"d"].decode(), epoch)
            for eid, f in entries
        ]
        return frames, epoch

    async def tenant_events_after(
        self, tenant: str, after: StreamPosition, limit: int | None = None
    ) -> tuple[list[Frame], str] | None:
        """The tenant's logged events after ``after`` (the first ``limit``) and the
        tenant's epoch, or None when the log cannot continue from there (as
        :meth:`events_after`)."""
        position = self.keys.tenant_position(tenant)
        log, start = self.keys.tenant_log(tenant), f"({_sid(after.seq)}"
        entries, (seq_b, epoch_b) = await transaction(
            self.redis,
            position,
            lambda p: (p.xrange(log, start, "+", count=limit), p.hmget(position, ["seq", "epoch"])),
        )
        tepoch = (epoch_b or b"").decode()
        if not _continues(after, entries, int(seq_b or 0), tepoch):
            return None
        frames = [
            Frame(
                _seq_of(eid),
                int(f[b"s"]),
                f[b"k"].decode(),
                f[b"j"].decode(),
                f[b"d"].decode(),
                f[b"e"].decode(),
                tepoch,
            )
            for eid, f in entries
        ]
        return frames, tepoch

    async def last_event(self, tenant: str, job_id: str) -> Frame | None:
        log = self.keys.job_log(tenant, job_id)
        entries = await self.redis.xrevrange(log, "+", "-", count=1)
        return _last_frame(job_id, entries)

    async def read_view(
        self, tenant: str, job_ids: list[str], recent: int, *, since_epoch: str = ""
    ) -> tuple[StreamPosition, dict[str, dict[str, Any] | None]]:
        """Atomically: the tenant's position and the named jobs, plus those of the
        ``recent`` ones that are still active (queued or running) or, when the tenant's
        history is no longer ``since_epoch``, were written in the new one."""
        keys = [self.keys.tenant_position(tenant), self.keys.tenant_index(tenant)]
        prefixes: list[str | int] = [
            self.keys.job(tenant, ""),
            recent,
            self.keys.job_output(tenant, ""),
            since_epoch,
        ]
        reply = await settled(  # reads job keys it is not given, as scan_index
            lambda: self._read(keys=keys, args=[*prefixes, *job_ids]), reads_only=True
        )
        view: dict[str, dict[str, Any] | None] = {}
        for i in range(2, len(reply), 3):
            flat = reply[i + 1]
            raw = dict(zip(flat[::2], flat[1::2], strict=True))
            view[reply[i].decode()] = decode_fields(raw, reply[i + 2]) if raw else None
        return StreamPosition(int(reply[0]), reply[1].decode()), view


def _last_frame(job_id: str, entries: list[Any]) -> Frame | None:
    if not entries:
        return None
    eid, f = entries[0]
    return Frame(int(f[b"t"]), _seq_of(eid), f[b"k"].decode(), job_id, f[b"d"].decode())


def _continues(after: StreamPosition, entries: list[Any], seq: int, epoch: str) -> bool:
    """Can a stream at ``after`` continue with ``entries``, the log after it?"""
    if not after.same_history(epoch) or after.seq > seq:
        return False  # another history, or a position from the future (rewound)
    if not entries:
        return after.seq == seq  # nothing after it, unless the log lost it
    return _seq_of(entries[0][0]) == after.seq + 1


def _sid(seq: int) -> str:
    return f"0-{seq}"


def _seq_of(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[1])
