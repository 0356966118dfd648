"""The stream endpoints: one job's events, many jobs' events, and stream tokens."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .api import get_owned_head, missing_job, not_theirs, services
from .auth import TENANT_SCOPE, job_scope
from .epoch import StreamPosition
from .errors import BadRequest, NotFound, RateLimited, Unavailable, ValidationFailed
from .job_stream import JobStream
from .models import StreamToken
from .mux_stream import MuxStream
from .operations import SSE, TEXT, Param, Reply, operation
from .responses import EventStream, JSONResponse
from .store import JobHead
from .streams import _Stream

if TYPE_CHECKING:  # app.py builds the services (and imports this module for its routes)
    from .app import Services

MAX_NAMED_JOBS = 100

# What the stream endpoints declare (the stats feed's too).
TOKEN = Param("query", "token", "a stream token (EventSource)", component="Token")
# An event id is a position, "<seq>.<epoch>" (a bare seq is read as in the current epoch).
EVENT_ID = {
    "type": "string",
    "pattern": r"^[0-9]{1,18}(\.[0-9A-Za-z]{1,32})?$",
    "examples": ["7.3f9a1c2e"],
}
RESUME = (
    Param("query", "last_event_id", "resume after this event id", EVENT_ID, "LastEventIdQuery"),
    Param(
        "header",
        "Last-Event-ID",
        "resume after this event id (EventSource)",
        EVENT_ID,
        "LastEventIdHeader",
    ),
)
EVENTS = Reply(
    200,
    "the stream: `snapshot` first, then every event once, in order. Events (`event:`):"
    " `snapshot` (the Job), `status`, `progress` (with `waiting` and `llm`), `output`"
    " (`delta`), `completed`, `failed`, `cancelled`, each with `id: <seq>.<epoch>`; and"
    " `queue` (`queue_position`, `starts_in_s` of a queued job), which has no `id:`",
    media=SSE,
    schema=TEXT,
)
ENDED = Reply(204, "resumed after the end: nothing more will come")
JOBS = Param(
    "query",
    "job",
    "jobs to follow (none: all the tenant's)",
    {"type": "array", "items": {"type": "string"}, "maxItems": MAX_NAMED_JOBS},
    explode=True,
)


def last_event_id(request: Request) -> StreamPosition | None:
    """``Last-Event-ID`` (header, as EventSource sends it) or ``?last_event_id=``:
    ``<seq>.<epoch>`` as sent, or a plain ``<seq>`` (older clients)."""
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if raw is None or raw == "":
        return None
    pos = StreamPosition.parse(raw)
    if pos is None:
        raise BadRequest("Last-Event-ID must be an event id this API sent", code="bad_event_id")
    return pos


async def _bus_ready(svc: Services) -> None:
    if not svc.settings.streams_enabled:
        raise Unavailable(
            "streaming is turned off here; poll GET /v1/jobs/{id}", code="streams_disabled"
        )
    if svc.bus.connected.is_set():
        return  # as it nearly always is: no waiter task, no timer
    try:
        await asyncio.wait_for(svc.bus.connected.wait(), svc.settings.stream_subscribe_timeout_s)
    except TimeoutError as exc:
        raise Unavailable(
            "event delivery is unavailable (Redis)", code="redis_unavailable"
        ) from exc


def _respond(svc: Services, stream: _Stream, tenant: str) -> Response:
    limit = svc.settings.tenant_max_streams
    if limit and svc.open_streams.get(tenant, 0) >= limit:
        raise RateLimited(f"at most {limit} open streams per tenant", retry_after_s=5)
    response = EventStream(
        _counted(svc.open_streams, tenant, stream.frames()),
        svc.drain,
        headers={"Cache-Control": "no-cache"},
    )
    stream.writer = response  # writes only once its task waits for events: after the start
    return response


async def _counted(
    counts: dict[str, int], tenant: str, frames: AsyncGenerator[bytes, None]
) -> AsyncIterator[bytes]:
    """Count the tenant's open streams while ``frames`` runs (per API process)."""
    counts[tenant] = counts.get(tenant, 0) + 1
    try:
        # aclosing: closed early, ``frames`` unsubscribes now, not in a finalizer task
        async with contextlib.aclosing(frames):
            async for chunk in frames:
                yield chunk
    finally:
        counts[tenant] -= 1
        if not counts[tenant]:
            del counts[tenant]


@operation(
    "jobEvents",
    "streams",
    "One job's events (SSE); closes after the terminal event",
    EVENTS,
    ENDED,
    errors=(BadRequest, NotFound),
    params=(TOKEN, *RESUME),
    auth="stream",
)
async def job_events(request: Request) -> Response:
    svc = services(request)
    job_id = request.path_params["job_id"]
    tenant = svc.auth.stream_tenant(request, {job_scope(job_id), TENANT_SCOPE})
    last_id = last_event_id(request)
    head = await _resumed_head(svc, tenant, job_id, last_id)
    await _bus_ready(svc)
    if head is not None and last_id is not None and _seen_the_end(head, last_id):
        return Response(status_code=204)  # nothing more will come: EventSource stops here
    return _respond(
        svc,
        JobStream(svc.reads, svc.bus, svc.settings, tenant, job_id, last_id, svc.line),
        tenant,
    )


async def _resumed_head(
    svc: Services, tenant: str, job_id: str, last_id: StreamPosition | None
) -> JobHead | None:
    """The job's head (not its snapshot: MBs of output). A client resuming a job the
    store no longer holds (Redis came back empty) gets a stream all the same: its worker
    may repair it, else the stream says ``state_lost`` after the grace and ends."""
    if last_id is None:
        return await get_owned_head(svc, tenant, job_id)
    _valid_id(job_id)
    head = (await svc.reads.heads(tenant, [job_id]))[1][job_id]
    if head is None and await not_theirs(svc, tenant, [job_id]):
        raise NotFound(f"no job {job_id!r}", code="job_not_found")
    return head


def _seen_the_end(head: JobHead, last_id: StreamPosition) -> bool:
    pos = head.position
    return head.status.terminal and last_id.seq == pos.seq and last_id.same_history(pos.epoch)


@operation(
    "manyEvents",
    "streams",
    "Many jobs' events over one connection (SSE)",
    EVENTS,
    ENDED,
    errors=(BadRequest, NotFound, ValidationFailed),
    params=(JOBS, TOKEN, *RESUME),
    auth="stream",
)
async def many_events(request: Request) -> Response:
    svc = services(request)
    job_ids = list(dict.fromkeys(request.query_params.getlist("job")))
    scopes = {TENANT_SCOPE} | ({job_scope(job_ids[0])} if len(job_ids) == 1 else set())
    tenant = svc.auth.stream_tenant(request, scopes)
    last_id = last_event_id(request)
    if len(job_ids) > MAX_NAMED_JOBS:
        raise ValidationFailed(f"name at most {MAX_NAMED_JOBS} jobs", code="too_many_jobs")
    for job_id in job_ids:
        _valid_id(job_id)
    # Heads, not snapshots: whose the jobs are and whether they ended, not their output.
    tpos, heads = await svc.reads.heads(tenant, job_ids)
    for job_id, head in heads.items():
        if head is None and last_id is None:
            raise await missing_job(svc, tenant, job_id)
    # A resume may name a job the store lost, never another tenant's.
    unknown = [job_id for job_id, head in heads.items() if head is None]
    if unknown and (foreign := await not_theirs(svc, tenant, unknown)):
        raise NotFound(f"no job {foreign!r}", code="job_not_found")
    await _bus_ready(svc)
    ended = last_id is not None and last_id.same_history(tpos.epoch)
    if last_id is not None and heads and ended and await _all_ended_before(svc, heads, last_id):
        return Response(status_code=204)  # the named jobs are over: EventSource stops
    stream = MuxStream(svc.reads, svc.bus, svc.settings, tenant, job_ids, last_id, svc.line)
    return _respond(svc, stream, tenant)


async def _all_ended_before(
    svc: Services, heads: dict[str, JobHead | None], cursor: StreamPosition
) -> bool:
    """Did every named job end, and did the client see each terminal event already?"""
    for job_id, head in heads.items():
        if head is None or not head.status.terminal:
            return False
        last = await svc.reads.last_event(head.tenant, job_id)
        if last is None or last.tseq > cursor.seq:
            return False
    return True


def _valid_id(job_id: str) -> None:
    try:
        uuid.UUID(job_id)
    except ValueError as exc:
        raise NotFound(f"no job {job_id!r}", code="job_not_found") from exc


@operation(
    "issueStreamToken",
    "streams",
    "A tenant-scoped token for `GET /v1/events?token=`",
    Reply(201, "the token", StreamToken),
)
async def stream_token(request: Request) -> Response:
    """A tenant-scoped token for ``GET /v1/events?token=`` (EventSource sends no headers)."""
    svc = services(request)
    tenant = svc.auth.tenant(request)
    token, expires = svc.auth.issue(tenant, TENANT_SCOPE)
    body = StreamToken(token=token, expires_at=expires, events_url=f"/v1/events?token={token}")
    return JSONResponse(body.model_dump(), status_code=201)


routes = [
    Route("/v1/jobs/{job_id}/events", job_events, methods=["GET"]),
    Route("/v1/events", many_events, methods=["GET"]),
    Route("/v1/stream-tokens", stream_token, methods=["POST"]),
]
