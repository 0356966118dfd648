"""What a stream sends, in order: a snapshot or a resume, live events, resyncs, the end.

``JobStream`` (job_stream.py) serves one job (``id:`` is the job's position ``<seq>.<epoch>``);
``MuxStream`` (mux_stream.py) serves many jobs of one tenant over one connection (``id:`` is the
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
from typing import TYPE_CHECKING

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .events import EventBus, StreamQueue
from .frames import Frame
from .reads import BulkReads, StoredJob
from .responses import chunks
from .settings import Settings

if TYPE_CHECKING:
    from .line import Line
    from .responses import EventStream

# Log entries a replay reads at once. A stream far behind catches up a page at a time,
# other work running between pages: a tenant log of megabytes read and encoded in one
# piece held the event loop long enough to delay other tenants (BENCHMARKS.md), and its
# frames in memory per stream.
REPLAY_PAGE = 256
PING = b": ping\n\n"  # keeps proxies from cutting an idle stream
# Kinds a caught-up stream writes straight from the bus (``_direct``); the others change
# what a stream follows or ends it, and go through its task.
DIRECT_KINDS = frozenset({"progress", "output", "status"})
DIRECT_MAX_BYTES = 8192  # larger frames go through the task, in slices (chunks())
REDIS_PAUSE_S = 0.5  # between a stream's reads while Redis is unreachable
logger = logging.getLogger(__name__)


async def _never() -> None:
    raise RuntimeError("a stream starts inside its subscription")


class _Stream:
    by_tseq = False
    redis_wait_s = 30.0  # how long a stream waits for an unreachable Redis

    def __init__(
        self,
        reads: BulkReads,
        bus: EventBus,
        settings: Settings,
        tenant: str,
        line: Line | None = None,
    ) -> None:
        self.reads, self.store = reads, reads.store
        self.bus, self.settings, self.tenant = bus, settings, tenant
        self.line = line  # places in line of the queued jobs it sends (None: not shown)
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
        self.writer: EventStream | None = None  # the response, for ``_direct`` writes
        self._subscribed: Callable[[], Awaitable[None]] = _never

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

    def accept_now(self, frame: Frame) -> list[Frame] | None:
        """``accept([frame])`` when it needs no read (a caught-up stream's next event);
        None when it may: the frame then goes through the stream's task."""
        raise NotImplementedError

    def _direct(self, frame: Frame) -> bool:
        """Write ``frame`` to the client now, from the bus, if this stream is caught up.

        Called by the queue only while the stream's task waits in ``queue.get`` with
        nothing pending: every earlier write has finished, so writing here keeps the
        order, and the task does not wake (most of what an event cost per stream was
        waking it: BENCHMARKS.md). False: the frame is queued for the task, as before.
        """
        writer = self.writer
        if (
            writer is None
            or writer.writing
            or frame.kind not in DIRECT_KINDS
            or len(frame.data) > DIRECT_MAX_BYTES
            or self.behind
            or self.missing
            or self.done
        ):
            return False
        out = self.accept_now(frame)
        if out is None:
            return False
        if out:
            if self.line is not None:
                self.line.note(self.queue, self.tenant, out)
            writer.write_now(b"".join([f.sse(self.by_tseq) for f in out]))
        return True

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
        left = await self.store.grace_left(self.tenant)
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
        # The first chunk (the response's headers wait for it: responses.EventStream)
        # goes once the stream has started, or once it waits for Redis.
        first: bytes | None = f"retry: {self.settings.retry_ms}\n\n".encode()
        try:
            async with self.bus.subscription(self.channel(), self.queue, self.jobs()) as ready:
                self.queue.direct = self._direct
                self._subscribed = ready
                step: Callable[[], Awaitable[list[Frame] | None]] = self._begin
                failing_since: float | None = None
                while True:
                    try:
                        out = await step()
                    except (RedisConnectionError, RedisTimeoutError) as exc:
                        failing_since = self._wait_for_redis(exc, failing_since, step)
                        if first is not None:
                            yield first
                            first = None
                        yield PING
                        await asyncio.sleep(REDIS_PAUSE_S)
                        continue
                    failing_since = None
                    if first is not None:
                        yield first
                        first = None
                    if out is None:
                        yield PING
                    else:
                        self._tell_line(out, step == self._begin)
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
            if first is not None:  # ended before it started: how soon to come back
                yield first
        finally:
            self.queue.direct = None
            if self.line is not None:
                self.line.leave(self.queue)

    async def _begin(self) -> list[Frame]:
        """``start``, once Redis confirmed the subscription (a connection error until then:
        the stream waits with heartbeats, as for an unreachable Redis)."""
        await self._subscribed()
        return await self.start()

    def followed(self) -> list[str]:
        """The jobs a started stream follows, whatever it sent (a resume may send none)."""
        return []

    def _tell_line(self, out: list[Frame], started: bool) -> None:
        """The places in line of the queued jobs it follows (line.py): those it just
        started on, and those whose snapshot or status it sends."""
        if self.line is not None:
            if started:
                self.line.follow(self.queue, self.tenant, self.followed())
            self.line.note(self.queue, self.tenant, out)

    def _wait_for_redis(
        self,
        exc: RedisConnectionError | RedisTimeoutError,
        failing_since: float | None,
        step: Callable[[], Awaitable[list[Frame] | None]],
    ) -> float:
        """Since when Redis has been unreachable; raises ``exc`` past ``redis_wait_s``."""
        failing_since = failing_since or time.monotonic()
        if time.monotonic() - failing_since > self.redis_wait_s:
            raise exc
        logger.info("stream waits for Redis (%s)", exc)
        if step != self._begin:  # the live frames it took: from the log
            self.queue.resync = True
        return failing_since

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
