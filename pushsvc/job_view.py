"""A client's view of one job, kept from its events: the ``Event`` type, the rules that
apply one to the job (``apply_event``), the events a polled snapshot brings
(``diff_snapshots``), and ``JobTracker``, which dedupes them by position.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .epoch import StreamPosition
from .models import TERMINAL

PROGRESS_FIELDS = ("progress", "stage", "message", "eta_s", "waiting", "llm")
QUEUE_FIELDS = ("queue_position", "starts_in_s")


@dataclass(frozen=True)
class Event:
    """One job event: ``id`` (the job's seq), ``kind`` and its JSON ``data``.

    ``source`` is ``"stream"``, or ``"poll"`` for events made from polled snapshots;
    ``epoch`` is the history ``id`` counts in (a new one comes with a reset snapshot).
    """

    id: int
    kind: str
    data: dict[str, Any]
    source: str = "stream"
    epoch: str = ""


# What an event carries besides the job's own fields: never part of the job.
_TRANSPORT = ("job_id", "ts", "reset", "polled")
# A new attempt starts afresh: the fields the worker resets as it starts one.
_FRESH_ATTEMPT = {
    "progress": 0.0,
    "stage": None,
    "message": None,
    "output": "",
    "eta_s": None,
    "waiting": None,
    "llm": None,
}
_OUT_OF_LINE = dict.fromkeys(QUEUE_FIELDS)


def apply_event(job: dict[str, Any], kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """The job after one event, changed as the server's snapshot changes with it.

    The rules are the contract's ("To keep a job's state from a stream"), and
    ``tests/golden/events.json`` holds their cases: ``web/pushsvc.js``'s ``applyEvent``
    passes the same ones. No event carries ``started_at`` or ``finished_at``: the server
    stamps them as it publishes a new attempt's ``running`` and a final event, so they
    are taken from that event's ``ts``.
    """
    fields = {k: v for k, v in data.items() if k not in _TRANSPORT}
    if kind == "snapshot":
        return {**fields, "id": data["job_id"]}
    after = {**job, "id": data["job_id"], "seq": data["seq"]}
    if kind == "status":
        if _starts_attempt(job, fields):
            after.update(_FRESH_ATTEMPT, started_at=data.get("ts"))
            after.pop("retry_in_s", None)  # the wait it announced is over
        after.update(_OUT_OF_LINE)  # back in line only with the next ``queue`` event
        after.update(fields)
    elif kind == "progress":
        after.update({k: data.get(k) for k in PROGRESS_FIELDS})
    elif kind == "queue":
        after.update({k: data.get(k) for k in QUEUE_FIELDS})
    elif kind == "output":
        after["output"] = (job.get("output") or "") + data["delta"]
    elif kind in TERMINAL:
        ts = data.get("ts")
        after.update(_final(kind, data), finished_at=job.get("finished_at") if ts is None else ts)
        after.update(_OUT_OF_LINE, waiting=None)
    return after


def _starts_attempt(job: dict[str, Any], change: dict[str, Any]) -> bool:
    """A ``running`` status for a job that was not running: not a cancel request."""
    return (
        change.get("status") == "running"
        and job.get("status") != "running"
        and not change.get("cancel_requested")
    )


def _final(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """What a final event sets. ``completed`` drops an earlier attempt's error; ``failed``
    keeps the job's result unless it carries one (an end rebuilt from a snapshot does not)."""
    if kind == "completed":
        done = {"result": data.get("result"), "error": None, "progress": 100.0, "eta_s": 0.0}
        return {"status": kind, **done}
    if kind == "failed":
        failed = {"status": kind, "error": data.get("error"), "eta_s": None}
        if "result" in data:
            failed["result"] = data["result"]
        return failed
    return {"status": kind, "eta_s": None}


def diff_snapshots(prev: dict[str, Any] | None, job: dict[str, Any]) -> list[Event]:
    """The events that turn snapshot ``prev`` into ``job`` (for pollers).

    Like the server's, an attempt's ``running`` and a final event carry the moment they
    stand for (the job's ``started_at``, ``finished_at``) as ``ts``: ``apply_event``
    takes those times from it. Other polled events carry the poll's time.
    """
    seq = job["seq"]
    base = {"job_id": job["id"], "seq": seq, "ts": time.time()}
    status, output = job["status"], job.get("output") or ""
    ended = status in TERMINAL
    if prev is None or _rewound(prev, job):
        snapshot = {k: v for k, v in job.items() if k not in ("id", "links")}
        events = [Event(seq, "snapshot", {**base, **snapshot}, "poll")]
    else:
        events = []
        if status != prev.get("status") and not ended:
            ts = _stamp(job, "started_at", base) if status == "running" else base["ts"]
            data = {**base, "ts": ts, "status": status, "attempt": job.get("attempt")}
            events.append(Event(seq, "status", data, "poll"))
        shown = prev.get("output") or ""
        if len(output) > len(shown):
            events.append(Event(seq, "output", {**base, "delta": output[len(shown) :]}, "poll"))
        if any(job.get(k) != prev.get(k) for k in PROGRESS_FIELDS):
            data = {**base, **{k: job.get(k) for k in PROGRESS_FIELDS}}
            events.append(Event(seq, "progress", data, "poll"))
        if status == "queued" and (status != prev.get("status") or _moved_in_line(prev, job)):
            data = {**base, **{k: job.get(k) for k in QUEUE_FIELDS}}
            events.append(Event(seq, "queue", data, "poll"))
    if ended:
        events.append(Event(seq, status, _polled_end(job, base), "poll"))
    return events


def _stamp(job: dict[str, Any], field: str, base: dict[str, Any]) -> Any:
    """The job's own time ``field`` as an event's ``ts`` (the poll's when it has none)."""
    at = job.get(field)
    return base["ts"] if at is None else at


def _polled_end(job: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The final event of a polled job that ended: what the server's carries. A failed
    job may keep a partial result, which a poller that saw it running has not seen."""
    end = {**base, "ts": _stamp(job, "finished_at", base)}
    if job["status"] == "completed":
        return {**end, "result": job.get("result")}
    if job["status"] == "failed":
        return {**end, "error": job.get("error"), "result": job.get("result")}
    return end


def _moved_in_line(prev: dict[str, Any], job: dict[str, Any]) -> bool:
    """A queued job whose place in line changed (no event, so no seq, says it)."""
    return job["status"] == "queued" and any(job.get(k) != prev.get(k) for k in QUEUE_FIELDS)


def _rewound(prev: dict[str, Any], job: dict[str, Any]) -> bool:
    """A change events cannot express: a new attempt or run, or text that shrank."""
    return (
        job.get("attempt") != prev.get("attempt")
        or job.get("epoch", "") != prev.get("epoch", "")
        or (job.get("progress") or 0) < (prev.get("progress") or 0)
        or not (job.get("output") or "").startswith(prev.get("output") or "")
        or (prev.get("status") in TERMINAL and job["status"] not in TERMINAL)
    )


class JobTracker:
    """One job as seen so far: dedupes by seq and knows when it ended."""

    def __init__(self) -> None:
        self.job: dict[str, Any] | None = None
        self.seq = 0
        self.epoch = ""
        self.ended = False

    @property
    def position(self) -> StreamPosition | None:
        return StreamPosition(self.seq, self.epoch) if self.job is not None else None

    def accept(self, event: Event) -> bool:
        seq = int(event.data.get("seq", event.id))
        # A finished job's stream repeats its terminal event with the snapshot's seq.
        echo = event.kind in TERMINAL and not self.ended and seq == self.seq
        new_history = event.kind == "snapshot" and event.epoch != self.epoch
        seen = self.job is not None and seq <= self.seq
        # A ``queue`` event tells the place in line at the job's current seq (no id).
        in_line = event.kind == "queue" and seq == self.seq and not self.ended
        if seen and not (echo or new_history or in_line or self._lost_end(event)):
            return False
        self.apply(event)
        return True

    def _lost_end(self, event: Event) -> bool:
        """The end of a job the store lost (``failed``, ``state_lost``), not seen yet: it
        counts whatever its seq, as in pushsvc.js. The API numbers it in a history that
        may have started again below what we saw; once the job ended, it is a duplicate."""
        error = event.data.get("error")
        lost = isinstance(error, dict) and error.get("code") == "state_lost"
        return event.kind == "failed" and lost and not self.ended

    def accept_snapshot(self, job: dict[str, Any]) -> list[Event]:
        """The events a polled snapshot brings (they share its seq: checked once, here)."""
        unseen_end = job["status"] in TERMINAL and not self.ended
        new_history = job.get("epoch", "") != self.epoch
        moved = self.job is not None and _moved_in_line(self.job, job)
        seen = self.job is not None and job["seq"] <= self.seq
        if seen and not (unseen_end or new_history or moved):
            return []
        events = diff_snapshots(self.job, job)
        for event in events:
            self.apply(event)
        self.epoch = job.get("epoch", "")
        return events

    def apply(self, event: Event) -> None:
        seq = int(event.data.get("seq", event.id))
        self.job = apply_event(self.job or {}, event.kind, event.data)
        self.seq = seq
        if event.epoch:
            self.epoch = event.epoch
        self.ended = event.kind in TERMINAL
