"""The state changes the API makes itself: cancel (``DELETE``) and a new run
(``POST /retry``), each a transition (``transitions.py``) published, then arq told."""

from __future__ import annotations

from typing import Any

from . import transitions
from .errors import Conflict, NotFound
from .models import JobStatus
from .publish import Published, Rejected, Reply
from .queue import Queue, new_arq_id
from .store import JobStore
from .transitions import Transition


async def cancel(store: JobStore, queue: Queue, tenant: str, job_id: str) -> JobStatus:
    """Cancel the job: ``cancelled`` if it was queued (it never runs), else ``running``
    with the cancel flagged and arq's abort sent. A finished job is a ``Conflict``."""
    # A job can move between queued and running (retries) while we act: try a few times.
    for _ in range(3):
        fields = await load(store, tenant, job_id)
        reply = await _cancel_step(store, fields)
        if isinstance(reply, Published):
            if reply.status == JobStatus.CANCELLED:  # it was queued: it never runs
                priority = fields.get("priority", "normal")
                await queue.forget(fields["arq_id"], priority, fields["tenant"])
            else:
                await queue.abort(fields["arq_id"])
            return reply.status
        if not isinstance(reply, Rejected) or reply.status.terminal:
            break
    status = reply.status if isinstance(reply, Rejected) else JobStatus(fields["status"])
    raise wrong_state(status, "cancel")


async def _cancel_step(store: JobStore, fields: dict[str, Any]) -> Reply:
    if fields["status"] == JobStatus.QUEUED:
        return await _publish(store, fields, transitions.cancelled(transitions.QUEUED))
    # Running: flag it and tell subscribers; the abort then cancels the task.
    return await _publish(store, fields, transitions.request_cancel(fields["attempt"]))


async def retry(store: JobStore, queue: Queue, tenant: str, job_id: str, seen: JobStatus) -> None:
    """Queue a failed or cancelled job again as a new run; else a ``Conflict`` (naming
    the state the store refused, or ``seen``)."""
    fields = await load(store, tenant, job_id)
    await store.remember_tenant(tenant, job_id)  # for a day more: it runs again
    arq_id = new_arq_id(job_id)
    enqueue = queue.prepare(arq_id, job_id, priority=fields["priority"], tenant=fields["tenant"])
    reply = await _publish(store, fields, transitions.new_run(fields, arq_id, enqueue))
    if not isinstance(reply, Published):
        raise wrong_state(reply.status if isinstance(reply, Rejected) else seen, "retry")


async def _publish(store: JobStore, fields: dict[str, Any], change: Transition) -> Reply:
    return await transitions.publish(store, fields["id"], fields["tenant"], change)


async def load(store: JobStore, tenant: str, job_id: str) -> dict[str, Any]:
    """The job's stored fields, if it is still the tenant's."""
    fields = await store.load(tenant, job_id)
    if fields is None or fields["tenant"] != tenant:  # expired since the first read
        raise NotFound(f"no job {job_id!r}", code="job_not_found")
    return fields


def wrong_state(status: JobStatus, action: str) -> Conflict:
    return Conflict(
        f"cannot {action} a job that is {status.value}",
        code="invalid_state",
        details={"status": status.value},
    )
