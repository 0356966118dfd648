"""A queued attempt's place in line: its position in arq's queue (1 starts next) and
when it should start, computed in Redis for a batch of jobs (their states read from
their tenants' keys, then their attempts' places by ``lua/line.lua`` from the queue's:
the two may be two Redis deployments, the data plane and the queue plane) and pushed
to the open streams that watch them as volatile ``queue`` events.

Nothing of it is stored: a place changes whenever any attempt ahead starts, so storing
it would be a write per queued job per start. Each API process computes places only for
the jobs its open streams watch (once a second, ``PUSHSVC_LINE_INTERVAL_S``) and for the
reads that show them (``GET /v1/jobs/{id}``, the listing); at most one such call per
process is in flight, later askers join the next one. The start rate is counted by the
workers, one ``INCR`` per attempt start into a per-second counter (``Keys.starts``, in
lua/started.lua with the start's turn), and
read over the last ``PUSHSVC_START_RATE_WINDOW_S`` seconds by the same call. It is the
rate of all attempt starts, not per job type: every type waits in the one queue, so a
place counts the attempts of every type ahead of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from .frames import Frame
from .keys import Keys
from .models import TERMINAL, JobSnapshot, JobStatus
from .settings import Settings

if TYPE_CHECKING:  # the streams' queues (events.py need not be imported for them)
    from .events import StreamQueue

logger = logging.getLogger(__name__)

STATE_FIELDS = ["status", "seq", "epoch", "arq_id"]  # what a place is read with

BATCH = 2000  # jobs per script call: one call holds Redis for about a millisecond
# A rate is never measured over less: the first starts (a burst as slots free at once)
# are not a rate; too short a span read 2 slots of 8 s jobs as 0.4 starts/s, not 0.25.
MIN_SPAN_S = 20.0
# What makes a place news for a stream that has the last one: a move of 2 % of the
# position (every move below 50), or of the start estimate by more than 5 % or a second.
POSITION_STEP = 0.02
ETA_STEP, ETA_STEP_S = 0.05, 1.0
JobKey = tuple[str, str]  # (tenant, job id): where a job's keys are (keys.job)
STATE_KINDS = frozenset({"snapshot", "status"})  # events that clear a client's place
STATUS_WITHIN = 1024  # a state frame's status is within its first characters


@dataclass(frozen=True, slots=True)
class Place:
    """A job's place as read now, at its ``seq`` (the ``queue`` event's seq)."""

    status: str
    seq: int
    epoch: str
    position: int | None  # None: not in arq's queue (running, backoff, finished)
    starts_in_s: float | None  # None: no start rate measured yet

    @property
    def in_line(self) -> bool:
        return self.status == "queued"


def moved(last: Place | None, new: Place) -> bool:
    """Is ``new`` worth a ``queue`` event to a stream whose client holds ``last`` (None:
    what a snapshot or status event left, both fields null)?"""
    if last is None:
        return new.position is not None
    if (last.seq, last.epoch) != (new.seq, new.epoch):
        return True
    if last.position is None or new.position is None:
        return last.position != new.position
    if abs(new.position - last.position) >= max(1, last.position * POSITION_STEP):
        return True
    if last.starts_in_s is None or new.starts_in_s is None:
        return last.starts_in_s != new.starts_in_s
    return abs(new.starts_in_s - last.starts_in_s) > max(ETA_STEP_S, last.starts_in_s * ETA_STEP)


def shows_queued(frame: Frame) -> bool:
    """Does a ``snapshot`` or ``status`` frame show its job queued? Read from the start of
    its JSON, where ``status`` is (a snapshot's text, megabytes maybe, comes after): 500
    streams resyncing a running job's snapshots each asked for its place in line, and
    their catch-up took 60 % longer."""
    return '"status":"queued"' in frame.data[:STATUS_WITHIN]


def start_rate(counts: list[int], now: float) -> float | None:
    """Starts a second from per-second ``counts`` (oldest first, the last one ``now``'s
    second): over the time since the window's first start, at least MIN_SPAN_S, so that a
    queue that was idle most of the window is not read as slow. None: nothing started."""
    total = sum(counts)
    if not total:
        return None
    first = next(i for i, c in enumerate(counts) if c)
    first_second = math.floor(now) - (len(counts) - 1 - first)
    return total / max(MIN_SPAN_S, now - first_second)


def starts_in(position: int | None, rate: float | None) -> float | None:
    if position is None or rate is None:
        return None
    return round(position / rate, 1)


def place_frame(job_id: str, place: Place) -> Frame:
    """The ``queue`` event: no SSE id (frames.VOLATILE), never logged or replayed."""
    body = {
        "job_id": job_id,
        "seq": place.seq,
        "ts": time.time(),
        "queue_position": place.position,
        "starts_in_s": place.starts_in_s,
    }
    return Frame(0, place.seq, "queue", job_id, json.dumps(body), place.epoch)


class Line:
    """One API process's places in line: the watched jobs, the ticker, the batched asks."""

    def __init__(self, redis: Redis, settings: Settings, data: Any = None) -> None:
        """``redis``: the queue plane's client; ``data``: the data plane's (the same Redis
        when not given)."""
        self.redis, self.keys = redis, Keys(settings.namespace)
        self.data = redis if data is None else data
        self.interval_s, self.window_s = settings.line_interval_s, settings.start_rate_window_s
        self._script = redis.register_script(
            (resources.files(__package__) / "lua" / "line.lua").read_text()
        )
        # A job (its tenant's: keys.job) -> the streams (their queues) watching it, each
        # with the place it last got. A stream watches only its own tenant's jobs.
        self._watches: dict[JobKey, dict[StreamQueue, Place | None]] = {}
        self._by_queue: dict[StreamQueue, set[JobKey]] = {}
        self._live: set[JobKey] = set()  # in line at the last look: asked every tick
        self._looked: dict[JobKey, Place] = {}  # each watched job's place at the last look
        self._fresh: set[JobKey] = set()  # changed state (or newly watched): asked at once
        self._wake = asyncio.Event()
        self._asking: set[JobKey] = set()  # the next call's jobs
        self._answer: asyncio.Future[dict[JobKey, Place]] | None = None  # the next call's
        self._sender: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.calls = 0  # script calls sent
        self.asked = 0  # jobs asked about
        self.sent = 0  # queue frames put into streams

    async def __aenter__(self) -> Line:
        self._ticker = asyncio.create_task(self._run(), name="pushsvc-line")
        return self

    async def __aexit__(self, *_exc: object) -> None:
        tasks = [t for t in (self._ticker, self._sender) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def watched(self) -> int:
        return len(self._watches)

    # -- what streams tell -------------------------------------------------------

    def note(self, queue: StreamQueue, tenant: str, frames: list[Frame]) -> None:
        """What a stream is about to send, in order: a snapshot or status event clears the
        client's place (the next one is looked up at once), a ``queue`` frame is the
        place it holds, a terminal event ends the watch. A place put into a stream that
        did not send it (the client held another seq) is put again at the next look."""
        for frame in frames:
            key = (tenant, frame.job_id)
            if frame.kind == "queue":
                self._shown(queue, key, frame)
            elif frame.kind in STATE_KINDS and shows_queued(frame):
                self._watch(queue, key)
            elif frame.kind in STATE_KINDS or frame.kind in TERMINAL:
                self._unwatch(queue, key)  # running or over: not in line

    def follow(self, queue: StreamQueue, tenant: str, job_ids: list[str]) -> None:
        """A stream of the tenant started on these jobs (a resume may have sent no state
        of them)."""
        for job_id in job_ids:
            self._watch(queue, (tenant, job_id))

    def leave(self, queue: StreamQueue) -> None:
        """The stream ended: its watches go."""
        for key in self._by_queue.pop(queue, set()):
            self._unwatch(queue, key)

    def _watch(self, queue: StreamQueue, key: JobKey) -> None:
        self._watches.setdefault(key, {})[queue] = None
        self._by_queue.setdefault(queue, set()).add(key)
        self._fresh.add(key)
        self._wake.set()

    def _shown(self, queue: StreamQueue, key: JobKey, frame: Frame) -> None:
        watchers = self._watches.get(key)
        if watchers is not None and queue in watchers:
            data = json.loads(frame.data)
            held = (data["queue_position"], data["starts_in_s"])
            watchers[queue] = Place("queued", frame.seq, frame.epoch, *held)

    def _unwatch(self, queue: StreamQueue, key: JobKey) -> None:
        watchers = self._watches.get(key)
        if watchers is not None:
            watchers.pop(queue, None)
            if not watchers:
                del self._watches[key]
                self._live.discard(key)
                self._looked.pop(key, None)
                self._fresh.discard(key)
        jobs = self._by_queue.get(queue)
        if jobs is not None:
            jobs.discard(key)

    # -- the ticker ----------------------------------------------------------------

    async def _run(self) -> None:
        """Every interval the jobs in line; at once the ones whose state just changed."""
        next_tick = time.monotonic()
        while True:
            wait = next_tick - time.monotonic()
            if wait > 0 and not self._fresh:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
            self._wake.clear()
            ask = set(self._fresh)
            self._fresh.clear()
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + self.interval_s
                ask |= self._live
            ask &= self._watches.keys()
            if ask:
                await self._tick(ask)

    async def _tick(self, job_ids: set[JobKey]) -> None:
        try:
            found = await self.places(job_ids)
        except (RedisError, OSError) as exc:
            logger.warning("places in line not read (%s); trying again next tick", exc)
            self._live |= job_ids
            return
        except Exception:  # a bug: the ticker must live on for every other stream
            logger.exception("places in line not read")
            return
        for job_id in job_ids:
            if job_id not in self._watches:  # its last stream left while we read
                self._live.discard(job_id)
                self._looked.pop(job_id, None)
                continue
            place = found.get(job_id)
            if place is not None and place.in_line:
                self._live.add(job_id)
            else:
                self._live.discard(job_id)
            if place is not None and not self._rose(job_id, place):
                self._deliver(job_id, place)

    def _rose(self, job_id: JobKey, place: Place) -> bool:
        """Is the job further back than at the last look? Then it is sent once the next
        look agrees: an attempt that just ended stays in arq's set for a moment after its
        lease went (arq removes it after the job function returned), and looks ahead."""
        before = self._looked.get(job_id)
        self._looked[job_id] = place
        if before is None or (before.seq, before.epoch) != (place.seq, place.epoch):
            return False
        return (place.position or 0) > (before.position or place.position or 0)

    def _deliver(self, job_id: JobKey, place: Place) -> None:
        """One frame, shared by every watching stream whose client's place it changes."""
        watchers = self._watches.get(job_id)
        if not watchers:
            return
        frame: Frame | None = None
        for queue, last in watchers.items():
            if not place.in_line:
                watchers[queue] = None  # its status event clears the client's place
            elif moved(last, place):  # ``last``: what the stream sent (``note``)
                frame = frame or place_frame(job_id[1], place)
                queue.put(frame)
                self.sent += 1

    # -- asking Redis ----------------------------------------------------------------

    async def show(self, tenant: str, snaps: list[JobSnapshot]) -> list[JobSnapshot]:
        """The tenant's ``snaps`` with the places of the queued ones (what reads answer);
        without them when Redis cannot say (the snapshot is worth more than its place)."""
        try:
            queued = [(tenant, s.id) for s in snaps if s.status == JobStatus.QUEUED]
            found = await self.places(queued)
        except (RedisError, OSError) as exc:
            logger.warning("places in line not read for a read (%s)", exc)
            return snaps
        out = []
        for snap in snaps:
            place = found.get((tenant, snap.id))
            if place is not None and place.in_line and snap.status == JobStatus.QUEUED:
                update = {"queue_position": place.position, "starts_in_s": place.starts_in_s}
                snap = snap.model_copy(update=update)  # shallow: the output is not copied
            out.append(snap)
        return out

    async def places(self, job_ids: Iterable[JobKey]) -> dict[JobKey, Place]:
        """The jobs' places as stored now (a job the store does not hold: absent).
        Joins the next call: one call per process in flight, however many ask."""
        want = list(job_ids)
        if not want:
            return {}
        self._asking.update(want)
        if self._answer is None:
            self._answer = asyncio.get_running_loop().create_future()
            self._answer.add_done_callback(_seen)
        answer = self._answer
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send(), name="pushsvc-line-ask")
        found = await asyncio.shield(answer)
        return {j: found[j] for j in want if j in found}

    async def _send(self) -> None:
        while self._asking:
            assert self._answer is not None
            asking, answer = self._asking, self._answer
            self._asking, self._answer = set(), None
            try:
                found = await self._read(sorted(asking))
            except Exception as exc:  # every asker gets it
                answer.set_exception(exc)
            else:
                answer.set_result(found)
            finally:
                answer.cancel()  # when cancelled itself (shutdown): no asker waits on

    async def _read(self, job_ids: list[JobKey]) -> dict[JobKey, Place]:
        found: dict[JobKey, Place] = {}
        for at in range(0, len(job_ids), BATCH):
            found.update(await self._read_batch(job_ids[at : at + BATCH]))
        return found

    async def _read_batch(self, job_ids: list[JobKey]) -> dict[JobKey, Place]:
        """The jobs' states (each in its tenant's slot), then the places in line of the
        queued ones' attempts (the queue plane): two reads, as the planes may be two."""
        async with self.data.pipeline(transaction=False) as pipe:
            for tenant, job_id in job_ids:
                pipe.hmget(self.keys.job(tenant, job_id), STATE_FIELDS)
            rows: list[list[bytes | None]] = await pipe.execute()
        waiting = [arq_id for status, _, _, arq_id in rows if status == b"queued" and arq_id]
        now = time.time()
        second = math.floor(now)
        counters = [self.keys.starts(s) for s in range(second - self.window_s + 1, second + 1)]
        keys = [self.keys.queue, self.keys.leases, *counters]
        positions, counts = await self._script(keys=keys, args=waiting)
        self.calls += 1
        self.asked += len(job_ids)
        rate = start_rate([int(c or 0) for c in counts], now)
        at: dict[bytes | None, int] = dict(zip(waiting, positions, strict=True))
        return dict(_places(job_ids, rows, at, rate))


def _places(
    job_ids: list[JobKey],
    rows: list[list[bytes | None]],
    positions: dict[bytes | None, int],
    rate: float | None,
) -> Iterable[tuple[JobKey, Place]]:
    for job_id, (status, seq, epoch, arq_id) in zip(job_ids, rows, strict=True):
        if not status:
            continue  # not in the store
        at = (positions.get(arq_id, 0) if status == b"queued" else 0) or None
        place = Place(
            status.decode(), int(seq or 0), (epoch or b"").decode(), at, starts_in(at, rate)
        )
        yield job_id, place


def _seen(answer: asyncio.Future[dict[JobKey, Place]]) -> None:
    if not answer.cancelled():
        answer.exception()  # retrieved: every asker may have left
