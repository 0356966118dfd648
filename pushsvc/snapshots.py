"""The frames a stream builds from stored state, rather than forwards: a job's snapshot,
its terminal event, and the failure of a job the store lost."""

from __future__ import annotations

import json
import time
from typing import Any

from .epoch import StreamPosition
from .fields import EVENT_EXCLUDE
from .frames import Frame
from .models import TERMINAL, JobSnapshot
from .reads import StoredJob

NO_TENANT_POSITION = StreamPosition(0)


def snapshot_frame(snap: JobSnapshot, tpos: StreamPosition | None, reset: bool) -> Frame:
    """The whole job; its SSE id is ``tpos`` on a multiplexed stream, else the job's."""
    body: dict[str, Any] = {"job_id": snap.id, "seq": snap.seq, "ts": time.time()}
    body.update(snap.model_dump(mode="json", exclude=EVENT_EXCLUDE))
    if reset:
        body["reset"] = True
    data = json.dumps(body, separators=(",", ":"))
    tpos = tpos or NO_TENANT_POSITION
    return Frame(tpos.seq, snap.seq, "snapshot", snap.id, data, snap.epoch, tpos.epoch)


def terminal_frame(snap: JobSnapshot, last: Frame | None, tpos: StreamPosition | None) -> Frame:
    """The finished job's terminal event: from its log, or rebuilt from the snapshot."""
    tpos = tpos or NO_TENANT_POSITION
    if last is not None and last.seq == snap.seq and last.kind in TERMINAL:
        return Frame(tpos.seq, last.seq, last.kind, snap.id, last.data, snap.epoch, tpos.epoch)
    body: dict[str, Any] = {"job_id": snap.id, "seq": snap.seq, "ts": snap.finished_at}
    if snap.status == "completed":
        body["result"] = snap.result
    elif snap.status == "failed":
        body["error"] = snap.error.model_dump() if snap.error else None
    data = json.dumps(body)
    return Frame(tpos.seq, snap.seq, snap.status.value, snap.id, data, snap.epoch, tpos.epoch)


def state_frames(stored: StoredJob, reset: bool) -> list[Frame]:
    """A per-job stream's snapshot of ``stored`` (and its terminal event, when it ended),
    built once for every stream that shares the read: a large output is encoded once."""
    frames = stored.frames.get(reset)
    if frames is None:
        frames = stored.frames[reset] = [snapshot_frame(stored.snap, None, reset)]
        if stored.snap.status.terminal:
            frames.append(terminal_frame(stored.snap, stored.last, None))
    return list(frames)  # the caller's list (streams append to it), the same frames


def lost_frame(job_id: str, pos: StreamPosition, tpos: StreamPosition | None) -> Frame:
    """A ``failed`` event for a job the store lost and no worker repaired."""
    error = {
        "code": "state_lost",
        "message": "the job store lost this job (Redis restarted without its data) "
        "before it could run; submit it again",
        "retryable": False,
    }
    seq = pos.seq + 1
    body = {"job_id": job_id, "seq": seq, "ts": time.time(), "error": error}
    tpos = tpos or NO_TENANT_POSITION
    return Frame(tpos.seq, seq, "failed", job_id, json.dumps(body), pos.epoch, tpos.epoch)
