"""``JobStream``: one job's stream; its ``id:`` is the job's position ``<seq>.<epoch>``."""

from __future__ import annotations

from .epoch import StreamPosition
from .events import EventBus
from .frames import VOLATILE, Frame
from .line import Line
from .models import TERMINAL
from .reads import BulkReads
from .settings import Settings
from .snapshots import lost_frame, state_frames
from .streams import REPLAY_PAGE, _Stream


class JobStream(_Stream):
    def __init__(
        self,
        reads: BulkReads,
        bus: EventBus,
        settings: Settings,
        tenant: str,
        job_id: str,
        last_id: StreamPosition | None,
        line: Line | None = None,
    ) -> None:
        super().__init__(reads, bus, settings, tenant, line)
        self.job_id, self.pos = job_id, last_id
        self.retired: set[str] = set()  # epochs this stream has moved on from

    def channel(self) -> str:
        return self.store.keys.job_channel(self.tenant, self.job_id)

    def followed(self) -> list[str]:
        return [] if self.done else [self.job_id]

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
        stored = self.reads.recent(self.tenant, self.job_id)
        if stored is None or stored.tenant != self.tenant or stored.snap.status.terminal:
            return await self._snapshot(reset=False)
        pos = StreamPosition(stored.snap.seq, stored.snap.epoch)
        found = await self.reads.events_after(self.tenant, self.job_id, pos, REPLAY_PAGE)
        if found is None:
            return await self._snapshot(reset=False)
        self.pos, self.holding = pos, stored
        return state_frames(stored, reset=False) + self._replayed(found[0])

    async def _snapshot(self, reset: bool) -> list[Frame]:
        self.behind = False  # whatever the log still held, the snapshot covers
        # Shared with this job's other streams.
        stored = await self.reads.job(self.tenant, self.job_id)
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
        found = await self.reads.events_after(self.tenant, self.job_id, self.pos, REPLAY_PAGE)
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
            if frame.kind in VOLATILE:
                pos = self.pos
                if pos is not None and pos.seq == frame.seq and pos.same_history(frame.epoch):
                    out.append(frame)  # else the client holds another seq: not for it
                continue
            now = self.accept_now(frame)
            out += now if now is not None else await self._catch_up(frame)
        return out

    def accept_now(self, frame: Frame) -> list[Frame] | None:
        pos = self.pos
        if pos is None or frame.epoch in self.retired or not pos.same_history(frame.epoch):
            return None
        if frame.seq <= pos.seq:
            return []
        if frame.first_seq > pos.seq + 1:
            return None  # missed something: the task reads the log
        return self._emit([frame])

    async def _catch_up(self, frame: Frame) -> list[Frame]:
        """What ``accept_now`` leaves to the task: a frame of another history (the store
        says what is true now), or one past a gap (the log has what was missed)."""
        if frame.epoch in self.retired:
            return []  # published before the history the stream now follows
        assert self.pos is not None
        out: list[Frame] = []
        if not self.pos.same_history(frame.epoch):
            out += await self._snapshot(reset=True)
            if self.pos.epoch != frame.epoch:
                self.retired.add(frame.epoch)
                return out
            now = self.accept_now(frame)
            if now is not None:
                return out + now
        return out + await self._fill()

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
