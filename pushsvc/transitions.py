"""The job state machine: one function per transition a worker or the API makes, each a
typed value.

A ``Transition`` says what to publish (event kind and data), which snapshot fields to
set, from which states it may start, and what to enqueue with it; the caller hands it to
the store (a worker together with who writes, ``publish.Writer``). Keeping them here means
the fields a transition touches are written once, not at every call site.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import JobError
from .fields import EVENT_EXCLUDE, to_snapshot
from .models import JobStatus
from .publish import Event, Reply
from .queue import Enqueue
from .store import JobStore

RUNNING = (JobStatus.RUNNING,)
QUEUED = (JobStatus.QUEUED,)


@dataclass(frozen=True)
class Transition:
    kind: str
    data: dict[str, Any]
    fields: dict[str, Any] = field(default_factory=dict)
    expect: tuple[JobStatus, ...] = RUNNING
    delta: str = ""
    enqueue: Enqueue | None = None
    then: Event | None = None  # a second event in the same call (``flush``)

    @property
    def text(self) -> str:
        """All the output the call appends (its delta, then its second event's)."""
        return self.delta + (self.then.delta if self.then else "")


async def publish(
    store: JobStore, job_id: str, tenant: str, change: Transition, **extra: Any
) -> Reply:
    """Publish ``change`` of one job; ``extra``: who writes, the tenant's limit,
    or an enqueue of the caller's own (``JobStore.publish``'s options)."""
    options: dict[str, Any] = {
        "expect": change.expect,
        "delta": change.delta,
        "enqueue": change.enqueue,
        "then": change.then,
        **extra,
    }
    return await store.publish(job_id, tenant, change.kind, change.data, change.fields, **options)


def start(job: dict[str, Any], owner: str, now: float) -> Transition:
    """queued -> running: a fresh attempt, owned by one worker run.

    An attempt after one that wrote output starts from empty text: it is announced as
    a whole ``snapshot``, which any SSE client applies by replacing its state, so no
    consumer appends the new attempt's text to the old one's. (Not marked ``reset``:
    no history was lost, the seq goes on.)
    """
    fields = {
        "status": "running",
        "owner": owner,
        "started_at": now,
        "progress": 0.0,
        "stage": None,
        "message": None,
        "output": "",
        "eta_s": None,
        "waiting": None,
        "llm": None,
    }
    if job["attempt"] == 1 and not job.get("output"):
        data = {"status": "running", "attempt": job["attempt"]}
        return Transition("status", data, fields, QUEUED)
    snap = to_snapshot({**job, **fields}).model_dump(mode="json", exclude=EVENT_EXCLUDE)
    return Transition("snapshot", snap, fields, QUEUED)


def progress(data: dict[str, Any]) -> Transition:
    """Progress, stage, message and ETA (merged by the throttle: latest wins)."""
    return Transition("progress", data, data)


def output(delta: str) -> Transition:
    return Transition("output", {"delta": delta}, delta=delta)


def flush(data: dict[str, Any] | None, delta: str) -> Transition | None:
    """A worker's throttled flush as one call: the latest progress (``data``, None if it
    did not change), then the text written since; None when there is nothing to send."""
    if data is None:
        return output(delta) if delta else None
    if not delta:
        return progress(data)
    return Transition("progress", data, data, then=Event("output", {"delta": delta}, delta))


def complete(result: Any) -> Transition:
    """running -> completed; the attempt's success clears any earlier attempt's error."""
    fields = {
        "status": "completed",
        "result": result,
        "error": None,
        "progress": 100.0,
        "eta_s": 0.0,
        "waiting": None,
        "finished_at": time.time(),
    }
    # ``error: null`` in the event too: a client that saw an earlier attempt's error drops it.
    return Transition("completed", {"result": result, "error": None}, fields)


def fail(exc: JobError) -> Transition:
    """running -> failed, for good: no attempt remains, so the error is not retryable."""
    error = {**exc.info(), "retryable": False}
    result = json.loads(json.dumps(exc.result, default=str))
    fields = {
        "status": "failed",
        "error": error,
        "result": result,
        "eta_s": None,
        "waiting": None,
        "finished_at": time.time(),
    }
    return Transition("failed", {"error": error, "result": result}, fields)


def cancelled(expect: tuple[JobStatus, ...] = RUNNING) -> Transition:
    fields = {"status": "cancelled", "eta_s": None, "waiting": None, "finished_at": time.time()}
    return Transition("cancelled", {}, fields, expect)


def retry_later(
    exc: JobError, attempt: int, arq_id: str, delay: float, enqueue: Enqueue
) -> Transition:
    """running -> queued as ``attempt`` (the same one after a worker shutdown)."""
    error = exc.info()
    waiting = {"reason": "backoff", "until": round(time.time() + delay, 3)} if delay > 0 else None
    data = {
        "status": "queued",
        "attempt": attempt,
        "error": error,
        "retry_in_s": round(delay, 3),
        "waiting": waiting,
    }
    fields = {
        "status": "queued",
        "attempt": attempt,
        "arq_id": arq_id,
        "owner": "",
        "error": error,
        "eta_s": None,
        "waiting": waiting,
    }
    return Transition("status", data, fields, enqueue=enqueue)


def wait_in_line(reason: str, until: float | None) -> Transition:
    """A queued job waits for something other than a free worker (its tenant's running
    limit): a ``status`` event that says so, the job still queued."""
    waiting = {"reason": reason, "until": None if until is None else round(until, 3)}
    return Transition(
        "status", {"status": "queued", "waiting": waiting}, {"waiting": waiting}, QUEUED
    )


def request_cancel(attempt: int) -> Transition:
    """running, flagged ``cancel`` (DELETE), announced as a ``status`` event with
    ``cancel_requested``; the arq abort then cancels the task and the runner ends it."""
    note = {"status": "running", "attempt": attempt, "cancel_requested": True}
    return Transition("status", note, {"cancel": "1"}, RUNNING)


def new_run(job: dict[str, Any], arq_id: str, enqueue: Enqueue) -> Transition:
    """failed|cancelled -> queued (POST /retry): a new run from attempt 1."""
    reset = {
        "status": "queued",
        "attempt": 1,
        "run": job["run"] + 1,
        "arq_id": arq_id,
        "cancel": "",
        "progress": 0.0,
        "stage": None,
        "message": None,
        "output": "",
        "result": None,
        "error": None,
        "started_at": None,
        "finished_at": None,
        "eta_s": None,
        "waiting": None,
        "llm": None,
    }
    # A new run replaces the job's state, so subscribers get it whole, as a snapshot.
    after = to_snapshot({**job, **reset, "seq": 0}).model_dump(mode="json", exclude=EVENT_EXCLUDE)
    return Transition(
        "snapshot", after, reset, (JobStatus.FAILED, JobStatus.CANCELLED), enqueue=enqueue
    )
