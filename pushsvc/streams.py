"""What a stream sends, in order: a snapshot or a resume, live events, resyncs, the end.

``JobStream`` serves one job (``id:`` is the job's position ``<seq>.<epoch>``);
``MuxStream`` serves many jobs of one tenant over one connection (``id:`` is the
tenant's position). Both subscribe first and read stored state only after Redis
confirmed the subscription (a snapshot that other streams are still sending may be
older: the log read after it fills the difference), then drop live events they already
sent, so a subscriber sees every event once and in order. Positions carry epochs
(epoch.py): an event of another history is never dropped as "already seen"; it makes
the stream send a ``reset`` snapshot of what the store holds now. A job that vanished
from the store (a Redis that came back empty) gets ``state_lost_grace_s`` for its
worker to repair it, then a ``failed`` event with ``error.code = "state_lost"``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .epoch import StreamPosition
from .events import EventBus, StreamQueue
from .frames import Frame
from .models import TERMINAL
from .reads import BulkReads, StoredJob
from .responses import chunks
from .settings import Settings
from .snapshots import (
    NO_TENANT_POSITION,
    lost_frame,
    snapshot_frame,
    state_frames,
    terminal_frame,
)
from .store import to_snapshot

# Log entries a replay reads at once. A stream far behind catches up a page at a time,
# other work running between pages: a 4 MB tenant log read and encoded in one piece
# held the event loop for 50 ms, and its frames in memory per stream.
REPLAY_PAGE = 256
PING = b": ping\n\n"  # keeps proxies from cutting an idle stream
REDIS_PAUSE_S = 0.5  # between a stream's reads while Redis is unreachable
logger = logging.getLogger(__name__)


class _Stream:
    by_tseq = False
    redis_wait_s = 30.0  # how long a stream waits for an unreachable Redis

    def __init__(self, reads: BulkReads, bus: EventBus, settings: Settings, tenant: str) -> None:
        self.reads, self.store = reads, reads.store
        self.bus, self.settings, self.tenant = bus, settings, tenant
        self.done = False
        self.queue = StreamQueue(
            settings.stream_coalesce_after,
            settings.stream_max_frames,
            settings.stream_max_bytes,
            bus.stats,
        )
        self.missing: dict[str, float] = {}  # job id -> when it counts as lost (monotonic)
        self.behind = False  # a replay stopped at a full page: the log holds more
        self.holding: StoredJob | None = None  # a shared read whose frames it is sending

    def channel(self) -> str:
        raise NotImplementedError

    def jobs(self) -> set[str] | None:
        """The jobs whose frames this stream wants from its channel (None: all)."""
        return None

    async def start(self) -> list[Frame]:
        raise NotImplementedError

    async def resync(self, overflowed: bool) -> list[Frame]:
        raise NotImplementedError

    async def accept(self, frames: list[Frame]) -> list[Frame]:
        raise NotImplementedError

    def _emit(self, frames: list[Frame]) -> list[Frame]:
        raise NotImplementedError

    def _replayed(self, frames: list[Frame]) -> list[Frame]:
        """A page of the log, to send; a full one leaves the stream ``behind``."""
        self.behind = len(frames) >= REPLAY_PAGE
        return self._emit(frames)

    async def check_lost(self) -> list[Frame]:
        """Jobs missing past their grace: read them again; lost ones end."""
        raise NotImplementedError

    async def _missing(self, job_ids: list[str]) -> None:
        """Jobs the store does not hold: each counts as lost when the grace that the
        store's last recovery gave ends (the same moment for every stream: a client that
        reconnects every few seconds must not start it again), or after a whole grace
        from now when no recovery is recorded."""
        new = [job_id for job_id in job_ids if job_id not in self.missing]
        if not new:
            return
        left = await self.store.grace_left()
        due = time.monotonic() + (self.settings.state_lost_grace_s if left is None else left)
        for job_id in new:
            self.missing[job_id] = due

    def _wait_s(self) -> float:
        if not self.missing:
            return self.settings.heartbeat_s
        due = min(self.missing.values()) - time.monotonic()
        return max(0.0, min(self.settings.heartbeat_s, due))

    def _lost_due(self) -> bool:
        return bool(self.missing) and min(self.missing.values()) <= time.monotonic()

    async def frames(self) -> AsyncGenerator[bytes, None]:
        """The stream's bytes; unsubscribes when the client goes (generator closed).

        Redis unreachable (a restart, a failover): the stream waits for it, with
        heartbeats, up to ``redis_wait_s``, then reads again what it could not (a closed
        stream would look ended to a generic client). Past that, or on another Redis
        error, it ends as a complete response: the client resumes with Last-Event-ID.
        """
        yield f"retry: {self.settings.retry_ms}\n\n".encode()
        try:
            async with self.bus.subscription(self.channel(), self.queue, self.jobs()):
                step: Callable[[], Awaitable[list[Frame] | None]] = self.start
                failing_since: float | None = None
                while True:
                    try:
                        out = await step()
                    except (RedisConnectionError, RedisTimeoutError) as exc:
                        failing_since = failing_since or time.monotonic()
                        if time.monotonic() - failing_since > self.redis_wait_s:
                            raise
                        logger.info("stream waits for Redis (%s)", exc)
                        if step != self.start:  # the live frames it took: from the log
                            self.queue.resync = True
                        yield PING
                        await asyncio.sleep(REDIS_PAUSE_S)
                        continue
                    failing_since = None
                    if out is None:
                        yield PING
                    else:
                        for i, chunk in enumerate(chunks(f.sse(self.by_tseq) for f in out)):
                            if i:  # a write that did not pause returns at once: let others run
                                await asyncio.sleep(0)
                            yield chunk  # large frames in slices: see chunks()
                        self.holding = None  # sent: others may still reuse it (reads.recent)
                        step = self._next
                    if self.done:
                        return
        except RedisError as exc:
            if isinstance(exc, RedisConnectionError | RedisTimeoutError):
                logger.warning("stream ended, Redis unavailable (%s); the client resumes", exc)
            else:
                logger.error("stream ended by a Redis error", exc_info=exc)

    async def _next(self) -> list[Frame] | None:
        """What to send next, once there is something; None: time for a heartbeat."""
        # Behind: the next page of the log, after one turn of the event loop.
        live = await self.queue.get(0 if self.behind else self._wait_s())
        out: list[Frame] = []
        if self.queue.resync or self.behind:
            overflowed = self.queue.overflowed
            self.queue.resync = self.queue.overflowed = False
            out = await self.resync(overflowed)
        elif not live and not self._lost_due():
            return None
        out += await self.accept(live)
        if self._lost_due() and not self.done:
            out += await self.check_lost()
        return out


class JobStream(_Stream):
    def __init__(
        self,
        reads: BulkReads,
        bus: EventBus,
        settings: Settings,
        tenant: str,
        job_id: str,
        last_id: StreamPosition | None,
    ) -> None:
        super().__init__(reads, bus, settings, tenant)
        self.job_id, self.pos = job_id, last_id
        self.retired: set[str] = set()  # epochs this stream has moved on from

    def channel(self) -> str:
        return self.store.keys.job_channel(self.job_id)

    async def start(self) -> list[Frame]:
        if self.pos is None:
            return await self._fresh()
        return await self._fill()

    async def _fresh(self) -> list[Frame]:
        """A new stream's snapshot. While other streams of the job are still sending one
        (slow readers), this one sends the same, then the events logged after it (read
        now, after subscribing): however staggered, slow readers of a job with a large
        output hold one copy of it, not one each. Otherwise, or when the log no longer
        continues from it, a snapshot read."""
        stored = self.reads.recent(self.job_id)
        if stored is None or stored.tenant != self.tenant or stored.snap.status.terminal:
            return await self._snapshot(reset=False)
        pos = StreamPosition(stored.snap.seq, stored.snap.epoch)
        found = await self.reads.events_after(self.job_id, pos, REPLAY_PAGE)
        if found is None:
            return await self._snapshot(reset=False)
        self.pos, self.holding = pos, stored
        return state_frames(stored, reset=False) + self._replayed(found[0])

    async def _snapshot(self, reset: bool) -> list[Frame]:
        self.behind = False  # whatever the log still held, the snapshot covers
        stored = await self.reads.job(self.job_id)  # shared with this job's other streams
        if stored is None or stored.tenant != self.tenant:  # gone: it may be repaired
            await self._missing([self.job_id])
            return []
        self.missing.clear()
        snap = stored.snap
        new = StreamPosition(snap.seq, snap.epoch)
        if reset and new == self.pos:
            return []  # nothing happened that the client has not seen
        if self.pos is not None and self.pos.epoch and self.pos.epoch != snap.epoch:
            self.retired.add(self.pos.epoch)
        self.retired.discard(snap.epoch)
        self.pos = new
        if snap.status.terminal:
            self.done = True
        self.holding = stored
        return state_frames(stored, reset)

    async def resync(self, overflowed: bool) -> list[Frame]:
        return await (self._snapshot(True) if overflowed else self._fill())

    async def _fill(self) -> list[Frame]:
        assert self.pos is not None
        found = await self.reads.events_after(self.job_id, self.pos, REPLAY_PAGE)
        return await self._snapshot(reset=True) if found is None else self._replayed(found[0])

    async def check_lost(self) -> list[Frame]:
        self.missing.clear()
        out = await self._snapshot(reset=True)
        if self.missing:  # still gone after the grace: nobody will repair it
            assert self.pos is not None
            self.done = True
            return [lost_frame(self.job_id, self.pos, None)]
        return out

    async def accept(self, frames: list[Frame]) -> list[Frame]:
        out: list[Frame] = []
        for frame in frames:
            if self.done or self.behind:
                break  # behind: these are in the log, after the page sent
            if frame.epoch in self.retired:
                continue  # published before the history the stream now follows
            assert self.pos is not None
            if not self.pos.same_history(frame.epoch):
                out += await self._snapshot(reset=True)  # the store says what is true now
                if self.pos.epoch != frame.epoch:
                    self.retired.add(frame.epoch)
                    continue
            if frame.seq <= self.pos.seq:
                continue
            if frame.first_seq > self.pos.seq + 1:  # missed something: the log has it
                out += await self._fill()
                continue
            out += self._emit([frame])
        return out

    def _emit(self, frames: list[Frame]) -> list[Frame]:
        out = []
        for frame in frames:
            if self.pos is not None and frame.seq <= self.pos.seq:
                continue
            out.append(frame)
            self.pos = frame.position
            if frame.kind in TERMINAL:
                self.done = True
                break
        return out


class MuxStream(_Stream):
    """Many jobs (named, or all of the tenant's) over one stream, resumable by the
    tenant's position."""

    by_tseq = True

    def __init__(
        self,
        reads: BulkReads,
        bus: EventBus,
        settings: Settings,
        tenant: str,
        job_ids: list[str],
        last_id: StreamPosition | None,
    ) -> None:
        super().__init__(reads, bus, settings, tenant)
        self.named = set(job_ids)
        self.cursor = last_id
        self.sent: dict[str, StreamPosition] = {}  # job id -> last position sent
        self.finished: set[str] = set()
        self.retired: set[str] = set()  # tenant epochs this stream has moved on from

    def channel(self) -> str:
        return self.store.keys.tenant_channel(self.tenant)

    def jobs(self) -> set[str] | None:
        return self.named or None

    async def start(self) -> list[Frame]:
        if self.cursor is not None:
            found = await self.reads.tenant_events_after(self.tenant, self.cursor, REPLAY_PAGE)
            if found is not None:
                await self._note_finished()
                return self._replayed(found[0])
        return await self._view(reset=self.cursor is not None)

    async def _note_finished(self) -> None:
        """On resume: named jobs that ended before the cursor count as ended already."""
        if not self.named:
            return
        _, heads = await self.reads.heads(self.tenant, sorted(self.named))
        for job_id, head in heads.items():
            if head is not None and head.status.terminal:
                self.finished.add(job_id)

    def _view_ids(self) -> tuple[list[str], int]:
        """The jobs a fresh view covers: the named ones; or the ones this stream follows
        and has not seen end, plus the recent active ones (all-jobs)."""
        if self.named:
            return sorted(self.named), 0
        following = sorted(set(self.sent) - self.finished)
        return following, self.settings.stream_recent_jobs

    async def _view(self, reset: bool) -> list[Frame]:
        """Snapshots of the jobs this stream covers, read atomically with the tenant's
        position, which becomes the cursor: later frames continue from there."""
        self.behind = False  # the view is newer than anything the log still held
        job_ids, recent = self._view_ids()
        # Into a new tenant history: also the jobs written in it, which may have ended
        # already (their frames are older than the view, so only the view shows them).
        since = self.cursor.epoch if self.cursor is not None else ""
        tpos, view = await self.reads.read_view(self.tenant, job_ids, recent, since_epoch=since)
        if self.cursor is not None and self.cursor.epoch and self.cursor.epoch != tpos.epoch:
            self.retired.add(self.cursor.epoch)
        self.retired.discard(tpos.epoch)
        self.cursor = tpos
        out: list[Frame] = []
        gone: list[str] = []
        for job_id, fields in view.items():
            if fields is None or fields.get("tenant") != self.tenant:
                # Its worker may still repair it. (One this stream saw end stays ended:
                # a store that forgot it knows nothing newer to tell.)
                if (job_id in self.named or job_id in self.sent) and job_id not in self.finished:
                    gone.append(job_id)
                continue
            self.missing.pop(job_id, None)
            snap = to_snapshot(fields)
            if reset and self.sent.get(job_id) == StreamPosition(snap.seq, snap.epoch):
                continue  # the client has this state already
            self.sent[job_id] = StreamPosition(snap.seq, snap.epoch)
            out.append(snapshot_frame(snap, tpos, reset))
            if snap.status.terminal:
                last = await self.reads.last_event(job_id)
                out.append(terminal_frame(snap, last, tpos))
                self.finished.add(job_id)
            else:
                self.finished.discard(job_id)
        await self._missing(gone)
        self._check_done()
        return out

    async def resync(self, overflowed: bool) -> list[Frame]:
        """After a reconnect or an overflow: the tenant log after the cursor, which is
        complete and capped (PUSHSVC_TENANT_LOG_CAP); fresh snapshots where it is not.

        (Snapshots of only the jobs the log shows as touched would race with events
        published between reading the log and reading the snapshots.)
        """
        assert self.cursor is not None
        found = await self.reads.tenant_events_after(self.tenant, self.cursor, REPLAY_PAGE)
        if found is None:  # the tenant log no longer reaches back: start afresh
            return await self._view(reset=True)
        return self._replayed(found[0])

    async def check_lost(self) -> list[Frame]:
        lost = {j for j, due in self.missing.items() if due <= time.monotonic()}
        out = await self._view(reset=True)
        cursor = self.cursor or NO_TENANT_POSITION
        for job_id in sorted(lost & set(self.missing)):  # still gone after the grace
            del self.missing[job_id]
            pos = self.sent.get(job_id, NO_TENANT_POSITION)
            out.append(lost_frame(job_id, pos, cursor))
            self.finished.add(job_id)
            self.sent.pop(job_id, None)
        self._check_done()
        return out

    async def accept(self, frames: list[Frame]) -> list[Frame]:
        out: list[Frame] = []
        for frame in frames:
            if self.behind:
                break  # these are in the log, after the page sent
            if not self._wanted(frame.job_id) or frame.tepoch in self.retired:
                continue
            if self._other_history(frame):
                out += await self._view(reset=True)  # the store says what is true now
                if self._other_history(frame):
                    continue  # older than what the view read
            known = self.sent.get(frame.job_id)
            if known is not None and frame.first_seq > known.seq + 1 and frame.kind != "snapshot":
                out += await self.resync(overflowed=False)  # the logs fill the gap
                if self.behind:
                    break
            out += self._emit([frame])
        return out

    def _other_history(self, frame: Frame) -> bool:
        """Is ``frame`` of another tenant or job history than what this stream sent?"""
        assert self.cursor is not None
        if not self.cursor.same_history(frame.tepoch):
            return True
        known = self.sent.get(frame.job_id)
        return (
            known is not None
            and frame.kind != "snapshot"  # a snapshot replaces: it needs no history
            and not known.same_history(frame.epoch)
        )

    def _wanted(self, job_id: str) -> bool:
        return not self.named or job_id in self.named

    def _replayed(self, frames: list[Frame]) -> list[Frame]:
        out = super()._replayed(frames)
        if frames:  # the next page starts after this one, whichever jobs it held
            self.cursor = frames[-1].tenant_position
        return out

    def _emit(self, frames: list[Frame]) -> list[Frame]:
        out = []
        for frame in frames:
            if self.done or not self._wanted(frame.job_id) or self._seen(frame):
                continue
            out.append(frame)
            self.sent[frame.job_id] = frame.position
            self.cursor = frame.tenant_position
            self.missing.pop(frame.job_id, None)
            if frame.kind in TERMINAL:
                self.finished.add(frame.job_id)
            elif frame.kind == "snapshot":
                self.finished.discard(frame.job_id)  # a retry starts the job again
        self._check_done()
        return out

    def _seen(self, frame: Frame) -> bool:
        cursor = self.cursor or NO_TENANT_POSITION
        if cursor.same_history(frame.tepoch) and frame.tseq <= cursor.seq:
            return True
        known = self.sent.get(frame.job_id)
        return known is not None and known.same_history(frame.epoch) and frame.seq <= known.seq

    def _check_done(self) -> None:
        # A named set ends when every job has ended; the all-jobs stream never does.
        self.done = bool(self.named) and self.named <= self.finished and not self.behind
