"""What a stream sends, in order: a snapshot or a resume, live events, resyncs, the end.

``JobStream`` serves one job (``id:`` is the job's seq); ``MuxStream`` serves many jobs
of one tenant over one connection (``id:`` is the tenant's seq). Both subscribe first
and read stored state only after Redis confirmed the subscription, then drop live
events they already sent, so a subscriber sees every event once and in order.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator
from typing import Any

from .events import TERMINAL_KINDS, EventBus, Frame, StreamQueue
from .models import JobSnapshot
from .settings import Settings
from .store import JobStore, to_snapshot


def snapshot_frame(snap: JobSnapshot, event_id: int, reset: bool) -> Frame:
    body: dict[str, Any] = {"job_id": snap.id, "seq": snap.seq, "ts": time.time()}
    body.update(snap.model_dump(mode="json", exclude={"seq"}))
    if reset:
        body["reset"] = True
    data = json.dumps(body, separators=(",", ":"))
    return Frame(event_id, snap.seq, "snapshot", snap.id, data)


def terminal_frame(snap: JobSnapshot, last: Frame | None, event_id: int) -> Frame:
    """The finished job's terminal event: from its log, or rebuilt from the snapshot."""
    if last is not None and last.seq == snap.seq and last.kind in TERMINAL_KINDS:
        return Frame(event_id, last.seq, last.kind, snap.id, last.data)
    body: dict[str, Any] = {"job_id": snap.id, "seq": snap.seq, "ts": snap.finished_at}
    if snap.status == "completed":
        body["result"] = snap.result
    elif snap.status == "failed":
        body["error"] = snap.error.model_dump() if snap.error else None
    return Frame(event_id, snap.seq, snap.status.value, snap.id, json.dumps(body))


class _Stream:
    by_tseq = False

    def __init__(self, store: JobStore, bus: EventBus, settings: Settings, tenant: str) -> None:
        self.store, self.bus, self.settings, self.tenant = store, bus, settings, tenant
        self.done = False
        self.queue = StreamQueue(
            settings.stream_coalesce_after,
            settings.stream_max_frames,
            settings.stream_max_bytes,
            bus.stats,
        )

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

    async def frames(self) -> AsyncGenerator[bytes, None]:
        """The stream's bytes; unsubscribes when the client goes (generator closed)."""
        yield f"retry: {self.settings.retry_ms}\n\n".encode()
        async with self.bus.subscription(self.channel(), self.queue, self.jobs()):
            out = await self.start()
            while True:
                if out:
                    yield b"".join(f.sse(self.by_tseq) for f in out)
                if self.done:
                    return
                out = []
                live = await self.queue.get(self.settings.heartbeat_s)
                if not live and not self.queue.resync:
                    yield b": ping\n\n"  # keeps proxies from cutting an idle stream
                    continue
                if self.queue.resync:
                    overflowed = self.queue.overflowed
                    self.queue.resync = self.queue.overflowed = False
                    out = await self.resync(overflowed)
                out += await self.accept(live)


class JobStream(_Stream):
    def __init__(
        self,
        store: JobStore,
        bus: EventBus,
        settings: Settings,
        tenant: str,
        job_id: str,
        last_id: int | None,
    ) -> None:
        super().__init__(store, bus, settings, tenant)
        self.job_id, self.sent = job_id, last_id

    def channel(self) -> str:
        return self.store.keys.job_channel(self.job_id)

    async def start(self) -> list[Frame]:
        if self.sent is None:
            return await self._snapshot(reset=False)
        events = await self.store.events_after(self.job_id, self.sent)
        if events is None:
            return await self._snapshot(reset=True)
        return self._emit(events)

    async def _snapshot(self, reset: bool) -> list[Frame]:
        snap = await self.store.snapshot(self.job_id, self.tenant)
        if snap is None:  # expired while streaming
            self.done = True
            return []
        self.sent = snap.seq
        out = [snapshot_frame(snap, snap.seq, reset)]
        if snap.status.terminal:
            out.append(terminal_frame(snap, await self.store.last_event(self.job_id), snap.seq))
            self.done = True
        return out

    async def resync(self, overflowed: bool) -> list[Frame]:
        return await (self._snapshot(True) if overflowed else self._fill())

    async def _fill(self) -> list[Frame]:
        assert self.sent is not None
        events = await self.store.events_after(self.job_id, self.sent)
        return await self._snapshot(reset=True) if events is None else self._emit(events)

    async def accept(self, frames: list[Frame]) -> list[Frame]:
        out: list[Frame] = []
        for frame in frames:
            if self.done:
                break
            assert self.sent is not None
            if frame.seq <= self.sent:
                continue
            if frame.first_seq > self.sent + 1:  # missed something: the log has it
                out += await self._fill()
                continue
            out += self._emit([frame])
        return out

    def _emit(self, frames: list[Frame]) -> list[Frame]:
        out = []
        for frame in frames:
            if self.sent is not None and frame.seq <= self.sent:
                continue
            out.append(frame)
            self.sent = frame.seq
            if frame.kind in TERMINAL_KINDS:
                self.done = True
                break
        return out


class MuxStream(_Stream):
    """Many jobs (named, or all of the tenant's) over one stream, resumable by tenant seq."""

    by_tseq = True

    def __init__(
        self,
        store: JobStore,
        bus: EventBus,
        settings: Settings,
        tenant: str,
        job_ids: list[str],
        last_id: int | None,
    ) -> None:
        super().__init__(store, bus, settings, tenant)
        self.named = set(job_ids)
        self.cursor = last_id
        self.sent: dict[str, int] = {}  # job id -> last job seq sent
        self.finished: set[str] = set()

    def channel(self) -> str:
        return self.store.keys.tenant_channel(self.tenant)

    def jobs(self) -> set[str] | None:
        return self.named or None

    async def start(self) -> list[Frame]:
        if self.cursor is not None:
            events = await self.store.tenant_events_after(self.tenant, self.cursor)
            if events is not None:
                await self._note_finished()
                return self._emit(events)
        return await self._view(sorted(self.named), reset=self.cursor is not None)

    async def _note_finished(self) -> None:
        """On resume: named jobs that ended before the cursor count as ended already."""
        if not self.named:
            return
        _, view = await self.store.read_view(self.tenant, sorted(self.named), 1)
        for job_id, fields in view.items():
            if fields is not None and to_snapshot(fields).status.terminal:
                self.finished.add(job_id)

    async def _view(self, job_ids: list[str], reset: bool) -> list[Frame]:
        """Snapshots of ``job_ids`` (all recent active ones when empty), read atomically."""
        tseq, view = await self.store.read_view(
            self.tenant, job_ids, self.settings.stream_recent_jobs
        )
        self.cursor = max(self.cursor or 0, tseq)
        out: list[Frame] = []
        for job_id, fields in view.items():
            if fields is None or fields.get("tenant") != self.tenant:
                continue
            snap = to_snapshot(fields)
            self.sent[job_id] = snap.seq
            out.append(snapshot_frame(snap, tseq, reset))
            if snap.status.terminal:
                last = await self.store.last_event(job_id)
                out.append(terminal_frame(snap, last, tseq))
                self.finished.add(job_id)
        self._check_done()
        return out

    async def resync(self, overflowed: bool) -> list[Frame]:
        """After a reconnect or an overflow: the tenant log after the cursor, which is
        complete and capped (PUSHSVC_TENANT_LOG_CAP); fresh snapshots where it is not.

        (Snapshots of only the jobs the log shows as touched would race with events
        published between reading the log and reading the snapshots.)
        """
        assert self.cursor is not None
        events = await self.store.tenant_events_after(self.tenant, self.cursor)
        if events is None:  # the tenant log no longer reaches back: start afresh
            return await self._view(sorted(self.named or self.sent), reset=True)
        return self._emit(events)

    async def accept(self, frames: list[Frame]) -> list[Frame]:
        out: list[Frame] = []
        for frame in frames:
            known = self.sent.get(frame.job_id)
            if known is not None and frame.first_seq > known + 1 and frame.kind != "snapshot":
                out += await self.resync(overflowed=False)  # the logs fill the gap
            out += self._emit([frame])
        return out

    def _wanted(self, job_id: str) -> bool:
        return not self.named or job_id in self.named

    def _emit(self, frames: list[Frame]) -> list[Frame]:
        out = []
        for frame in frames:
            if self.done or not self._wanted(frame.job_id):
                continue
            if frame.seq <= self.sent.get(frame.job_id, 0) or frame.tseq <= (self.cursor or 0):
                continue
            out.append(frame)
            self.sent[frame.job_id] = frame.seq
            self.cursor = frame.tseq
            if frame.kind in TERMINAL_KINDS:
                self.finished.add(frame.job_id)
            elif frame.kind == "snapshot":
                self.finished.discard(frame.job_id)  # a retry starts the job again
        self._check_done()
        return out

    def _check_done(self) -> None:
        # A named set ends when every job has ended; the all-jobs stream never does.
        self.done = bool(self.named) and self.named <= self.finished
