"""``MuxStream``: many jobs of one tenant over one stream; its ``id:`` is the tenant's
position."""

from __future__ import annotations

import time

from .epoch import StreamPosition
from .events import EventBus
from .fields import to_snapshot
from .frames import VOLATILE, Frame
from .line import Line
from .models import TERMINAL
from .reads import BulkReads
from .settings import Settings
from .snapshots import NO_TENANT_POSITION, lost_frame, snapshot_frame, terminal_frame
from .streams import REPLAY_PAGE, _Stream


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
        line: Line | None = None,
    ) -> None:
        super().__init__(reads, bus, settings, tenant, line)
        self.named = set(job_ids)
        self.cursor = last_id
        self.sent: dict[str, StreamPosition] = {}  # job id -> last position sent
        self.finished: set[str] = set()
        self.retired: set[str] = set()  # tenant epochs this stream has moved on from

    def channel(self) -> str:
        return self.store.keys.tenant_channel(self.tenant)

    def jobs(self) -> set[str] | None:
        return self.named or None

    def followed(self) -> list[str]:
        return sorted(self.named - self.finished)

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
                last = await self.reads.last_event(self.tenant, job_id)
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
            if frame.kind in VOLATILE:
                out += self._placed(frame)
                continue
            now = self.accept_now(frame)
            out += now if now is not None else await self._catch_up(frame)
        return out

    def accept_now(self, frame: Frame) -> list[Frame] | None:
        if not self._wanted(frame.job_id):
            return []
        if self.cursor is None or frame.tepoch in self.retired or self._other_history(frame):
            return None
        if self._gap(frame):
            return None  # missed something: the task reads the logs
        return self._emit([frame])

    async def _catch_up(self, frame: Frame) -> list[Frame]:
        """What ``accept_now`` leaves to the task: a frame of another history (the view
        is read again), or one past a gap (the logs fill it)."""
        if frame.tepoch in self.retired:
            return []
        out: list[Frame] = []
        if self._other_history(frame):
            out += await self._view(reset=True)  # the store says what is true now
            if self._other_history(frame):
                return out  # older than what the view read
        if self._gap(frame):
            out += await self.resync(overflowed=False)  # the logs fill the gap
            if self.behind:
                return out
        return out + self._emit([frame])

    def _gap(self, frame: Frame) -> bool:
        """Did this stream miss events of the frame's job before it? (A snapshot
        replaces what came before: it leaves no gap.) A job this stream never sent
        starts with a snapshot (its creation, a retry, a re-run; active ones came with
        the view): any other first event means its snapshot was missed, the message lost
        (a pub/sub reconnect, a shard failing over or a slot moving under it)."""
        if frame.kind == "snapshot":
            return False
        known = self.sent.get(frame.job_id)
        return known is None or frame.first_seq > known.seq + 1

    def _placed(self, frame: Frame) -> list[Frame]:
        """A ``queue`` frame, sent when the client holds the job at the frame's seq, or
        may: a resumed stream sent nothing of a job that did not change since the cursor
        (the client then holds it at its head, and applies the frame only if so)."""
        if frame.job_id in self.finished:
            return []
        held = self.sent.get(frame.job_id)
        return [frame] if held is None or held == frame.position else []

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
