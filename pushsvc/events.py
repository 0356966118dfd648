"""The API side of pub/sub: one connection per process, fanned out to bounded queues.

Channels are subscribed by reference count as streams come and go, and a stream reads
stored state only after Redis has *confirmed* its subscription, so nothing published
in between is lost. When the connection drops, the bus reconnects with backoff,
resubscribes, and tells every queue to refill from the stored logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .backoff import Delays, ExponentialBackoff
from .connections import is_sentinel_url, make_pool, primary_moved
from .frames import VOLATILE, Frame
from .keys import Keys
from .settings import Settings

logger = logging.getLogger(__name__)
MERGEABLE = frozenset({"progress", "output"})


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


@dataclass
class QueueStats:
    """Totals across every stream queue of a process (read by /metrics)."""

    merged: int = 0
    resyncs: int = 0
    buffered_bytes: int = 0


class StreamQueue:  # one per open stream: kept small (__slots__, plain dicts)
    """A stream's bounded buffer between the bus and a slow or fast reader.

    Past ``coalesce_after`` frames, progress and output frames merge with the job's
    latest pending frame of the same kind. Past ``max_frames`` or ``max_bytes`` the
    buffer is dropped and the reader is told to resync from stored state. Status and
    terminal frames are never merged. A job's ``queue`` frame (line.py) replaces its
    pending one and goes after the other frames; being at most one per job, those count
    toward no limit.
    """

    __slots__ = (
        "stats",
        "_pending",
        "_places",
        "_last_of",
        "_barrier",
        "_next",
        "_bytes",
        "_limits",
        "_waiter",
        "resync",
        "overflowed",
        "direct",
    )

    def __init__(
        self, coalesce_after: int, max_frames: int, max_bytes: int, stats: QueueStats
    ) -> None:
        self.stats = stats
        # Insertion-ordered; merged frames are re-inserted under a new, larger key.
        self._pending: dict[int, Frame] = {}
        self._places: dict[str, Frame] = {}  # job -> its latest ``queue`` frame
        self._last_of: dict[tuple[str, str], int] = {}  # (job, kind) -> pending position
        self._barrier: dict[str, int] = {}  # job -> position of its last unmergeable frame
        self._next = 0
        self._bytes = 0
        self._limits = (coalesce_after, max_frames, max_bytes)
        # A bare future, not asyncio.Event: this is the hot path of every delivery.
        self._waiter: asyncio.Future[None] | None = None
        self.resync = False  # set by overflow or a bus reconnect; the reader clears it
        self.overflowed = False
        # The stream's writer of a frame while its reader waits here with nothing
        # pending (streams.py ``_direct``); False: not written, queue it.
        self.direct: Callable[[Frame], bool] | None = None

    def put(self, frame: Frame) -> None:
        waiter = self._waiter
        if (
            self.direct is not None
            and waiter is not None
            and not waiter.done()  # done: the reader is waking; it takes the frame
            and not self._pending
            and not self._places
            and not self.resync
            and self.direct(frame)
        ):
            return
        if frame.kind in VOLATILE:
            self._places.pop(frame.job_id, None)
            self._places[frame.job_id] = frame
            self._wake()
            return
        coalesce_after, max_frames, max_bytes = self._limits
        if len(self._pending) >= coalesce_after and frame.kind in MERGEABLE:
            frame = self._merge_into_latest(frame)
        self._pending[self._next] = frame
        if frame.kind in MERGEABLE:
            self._last_of[(frame.job_id, frame.kind)] = self._next
        else:
            self._barrier[frame.job_id] = self._next
        self._next += 1
        self._add_bytes(len(frame.data))
        if len(self._pending) > max_frames or self._bytes > max_bytes:
            self.clear()
            self.resync = self.overflowed = True
            self.stats.resyncs += 1
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None:
            _resolve(self._waiter)

    def _merge_into_latest(self, frame: Frame) -> Frame:
        """Fold the job's latest pending frame of this kind into ``frame``.

        Only past the job's last status/snapshot/terminal frame: progress and output
        may be reordered with each other, never across a change of state.
        """
        older_at = self._last_of.get((frame.job_id, frame.kind))
        if older_at is None or older_at < self._barrier.get(frame.job_id, -1):
            return frame
        if self._pending[older_at].epoch != frame.epoch:
            return frame  # two histories: the reader resyncs at the boundary
        older = self._pending.pop(older_at)
        self._add_bytes(-len(older.data))
        self.stats.merged += 1
        return older.merge(frame)

    def _add_bytes(self, n: int) -> None:
        self._bytes += n
        self.stats.buffered_bytes += n

    def mark_resync(self) -> None:
        self.resync = True
        self._wake()

    def clear(self) -> None:
        self._pending.clear()
        self._places.clear()
        self._last_of.clear()
        self._barrier.clear()
        self._add_bytes(-self._bytes)

    async def get(self, timeout: float) -> list[Frame]:
        """Everything pending, oldest first; empty after ``timeout`` s of silence (time for
        a heartbeat) or when only a resync is due."""
        if not self._pending and not self._places and not self.resync:
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            # A timer handle, not wait_for: no extra task on every delivery.
            timer = loop.call_later(timeout, _resolve, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        frames = [*self._pending.values(), *self._places.values()]
        self.clear()
        return frames

    def __len__(self) -> int:
        return len(self._pending) + len(self._places)


@dataclass
class _Channel:
    queues: set[StreamQueue] = field(default_factory=set)  # every frame of the channel
    by_job: dict[str, set[StreamQueue]] = field(default_factory=dict)  # only these jobs
    confirmed: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def unconfirm(self) -> None:
        """A new connection: the subscription is to be confirmed there (the same entry,
        which its streams hold and remove when they end)."""
        if self.confirmed.done():
            self.confirmed = asyncio.get_running_loop().create_future()


class EventBus:
    """One pub/sub connection for the whole process; owns its reader task."""

    # Subscriptions are confirmed by the reader, later (a confirmation of a channel
    # whose streams have gone is then one to skip); sharded_bus.py's, by the call.
    confirms_later = True

    def __init__(self, settings: Settings, on_event: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self._on_event = on_event  # sees each routed event once (latency metrics)
        self.keys = Keys(settings.namespace)
        self._pool = make_pool(settings, socket_connect_timeout=2)
        self._redis = Redis.from_pool(self._pool)  # closes its pool with it
        # A Sentinel-managed primary can move under the pub/sub connection: look each second.
        self._check_s = 1.0 if is_sentinel_url(settings.redis_url) else None
        self._pubsub: PubSub | None = None
        self._channels: dict[str, _Channel] = {}
        self._stale_confirms: dict[str, int] = {}
        self._reader: asyncio.Task[None] | None = None
        self._streams: set[StreamQueue] = set()
        # Keeps the connection subscribed (and readable) while no stream is open.
        self._control = f"{self.keys.ns}:bus:{secrets.token_hex(6)}"
        self.connected = asyncio.Event()
        self.reconnects = 0
        self.delivered = 0
        self.stats = QueueStats()

    async def __aenter__(self) -> EventBus:
        self._reader = asyncio.create_task(self._run(), name="pushsvc-bus")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._pubsub is not None:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self._redis.aclose()

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    @contextlib.asynccontextmanager
    async def subscription(
        self, channel: str, queue: StreamQueue, jobs: set[str] | None = None
    ) -> AsyncIterator[Callable[[], Awaitable[None]]]:
        """Route ``channel`` (only ``jobs``' frames, when given) to ``queue`` while inside.

        Gives a wait for Redis to confirm the subscription: state read after it returns is
        not older than the first frame routed. It raises a connection error after
        ``stream_subscribe_timeout_s`` and may be awaited again (a stream sends heartbeats
        meanwhile: a shard failing over takes seconds).
        """
        entry = self._channels.get(channel)
        new = entry is None
        if entry is None:
            entry = self._channels[channel] = _Channel()
        _add(entry, queue, jobs)
        self._streams.add(queue)
        try:  # from here on, a stream stopped (cancelled) leaves nothing behind
            # Else the reader subscribes it when it can; or (sharded) the wait does.
            if new and self.connected.is_set() and self.confirms_later:
                await self._send_subscribe(channel, entry)
            yield functools.partial(self._confirmed, channel, entry)
        finally:
            self._streams.discard(queue)
            queue.clear()  # what it still held is gone with it (and off the byte gauge)
            _remove(entry, queue, jobs)
            if not (entry.queues or entry.by_job) and self._channels.get(channel) is entry:
                del self._channels[channel]
                if not entry.confirmed.done():
                    entry.confirmed.cancel()
                    if self.confirms_later:
                        stale = self._stale_confirms.get(channel, 0) + 1
                        self._stale_confirms[channel] = stale
                await self._send_unsubscribe(channel)

    async def _confirmed(self, channel: str, entry: _Channel) -> None:
        await self._wait_confirmed(entry)

    async def _wait_confirmed(self, entry: _Channel) -> None:
        timeout = self.settings.stream_subscribe_timeout_s
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancellation that
            # lands as the future completes, and a stream being stopped must stop.
            async with asyncio.timeout(timeout):
                await asyncio.shield(entry.confirmed)
        except TimeoutError as exc:
            raise RedisConnectionError("pub/sub subscription was not confirmed") from exc

    async def _send_subscribe(self, channel: str, entry: _Channel) -> None:
        assert self._pubsub is not None
        try:
            await self._pubsub.subscribe(channel)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            pass  # the reader reconnects and subscribes every channel again

    async def _send_unsubscribe(self, channel: str) -> None:
        if self._pubsub is None or not self.connected.is_set():
            return
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError):
            await self._pubsub.unsubscribe(channel)

    # -- the reader ------------------------------------------------------------

    async def _run(self) -> None:
        delays = Delays(ExponentialBackoff(cap=2.0, base=0.05))
        while True:
            try:
                await self._connect()
                delays.reset()
                await self._read()  # returns only by raising
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                delay = delays.next()
                logger.warning("pub/sub connection lost (%s); reconnecting in %.2fs", exc, delay)
                self.connected.clear()
                await asyncio.sleep(delay)

    async def _connect(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        self._stale_confirms.clear()
        for entry in self._channels.values():
            entry.unconfirm()  # confirmed on the old connection: confirm again
        self._pubsub = self._redis.pubsub()
        await self._pubsub.subscribe(self._control, *self._channels)
        self.connected.set()
        if self.reconnects:
            for queue in self._streams:
                queue.mark_resync()  # whatever was published meanwhile is in the logs
        self.reconnects += 1

    async def _read(self) -> None:
        assert self._pubsub is not None
        checked = time.monotonic()
        while True:
            msg = await self._pubsub.get_message(timeout=self._check_s)
            if self._check_s is not None and time.monotonic() - checked >= self._check_s:
                checked = time.monotonic()
                if await primary_moved(self._pool, self._pubsub.connection):
                    raise RedisConnectionError("the primary moved (a Sentinel failover)")
            if msg is None:
                continue
            kind, channel = msg["type"], msg["channel"].decode()
            if kind == "message":
                self._route(channel, msg["data"])
            elif kind == "subscribe":
                self._confirm(channel)

    def _confirm(self, channel: str) -> None:
        stale = self._stale_confirms.get(channel, 0)
        if stale:  # an answer to a subscribe whose streams have already gone
            self._stale_confirms[channel] = stale - 1
            return
        entry = self._channels.get(channel)
        if entry is not None and not entry.confirmed.done():
            entry.confirmed.set_result(None)

    def _route(self, channel: str, raw: bytes) -> None:
        entry = self._channels.get(channel)
        if entry is None:
            return
        frame = Frame.parse(raw)
        targets = entry.by_job.get(frame.job_id)
        if not entry.queues and not targets:
            return
        if self._on_event is not None:
            self._on_event(frame.data)
        for queue in entry.queues:
            queue.put(frame)
        for queue in targets or ():
            queue.put(frame)
        self.delivered += len(entry.queues) + len(targets or ())


def _add(entry: _Channel, queue: StreamQueue, jobs: set[str] | None) -> None:
    if jobs is None:
        entry.queues.add(queue)
        return
    for job_id in jobs:
        entry.by_job.setdefault(job_id, set()).add(queue)


def _remove(entry: _Channel, queue: StreamQueue, jobs: set[str] | None) -> None:
    if jobs is None:
        entry.queues.discard(queue)
        return
    for job_id in jobs:
        targets = entry.by_job.get(job_id)
        if targets is not None:
            targets.discard(queue)
            if not targets:
                del entry.by_job[job_id]


def make_bus(settings: Settings, on_event: Callable[[str], None] | None = None) -> EventBus:
    """The process's event bus: sharded (sharded_bus.py) when the data plane is a Redis
    Cluster, else on the one Redis."""
    if settings.data_cluster:
        from .sharded_bus import ShardedBus  # valkey-glide, loaded only for a cluster

        return ShardedBus(settings, on_event)
    return EventBus(settings, on_event)
