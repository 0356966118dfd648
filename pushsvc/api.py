"""The job endpoints of the v1 contract (streams live in sse.py)."""

from __future__ import annotations

import hashlib
import logging
import math
import time
import uuid
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import actions, listing
from .auth import job_scope
from .bodies import parse_submit, read_json, validation_details
from .data_plane import transaction
from .errors import (
    ApiError,
    BadRequest,
    Conflict,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unavailable,
    ValidationFailed,
)
from .fields import to_snapshot
from .jobs import JobType
from .models import (
    CancelRequested,
    Job,
    JobLinks,
    JobPage,
    JobSnapshot,
    JobStatus,
    JobTypeInfo,
    JobTypes,
    SubmitRequest,
)
from .operations import Header, Param, Reply, by_method, operation, schema_ref
from .queue import new_arq_id
from .responses import JSONResponse, json_response
from .settings import Settings
from .store import JobHead

if TYPE_CHECKING:  # app.py builds the services (and imports this module for its routes)
    from .app import Services

logger = logging.getLogger(__name__)


def services(request: Request) -> Services:
    """What the lifespan opened (``app.Services``), for a handler."""
    svc: Services = request.app.state.services
    return svc


def job_body(svc: Services, tenant: str, snap: JobSnapshot, model: type[Job] = Job) -> Job:
    """The snapshot plus links; ``events`` carries a job-scoped token for EventSource."""
    token, expires = svc.auth.issue(tenant, job_scope(snap.id))
    links = JobLinks(
        self=f"/v1/jobs/{snap.id}",
        events=f"/v1/jobs/{snap.id}/events?token={token}",
        events_expires_at=expires,
    )
    # Built, not validated: the snapshot was, and its output may be megabytes.
    return model.model_construct(**dict(snap), links=links)


async def _check_rate(svc: Services, tenant: str) -> None:
    """A fixed one-minute window per tenant: cheap, shared by every API process."""
    limit = svc.settings.tenant_submits_per_minute
    if not limit:
        return
    now = time.time()
    key = svc.store.keys.submit_window(tenant, int(now // 60))
    count, _ = await transaction(svc.store.redis, key, lambda p: (p.incr(key), p.expire(key, 61)))
    if count > limit:
        raise RateLimited(
            f"more than {limit} submissions a minute", retry_after_s=math.ceil(60 - now % 60)
        )


LOCATION = Header("Location", "/v1/jobs/{id}")
ETAG = Header("ETag", "the job's position (and place in line, while queued), quoted")
POLL_HINT = Header("Retry-After", "seconds a poller should wait (while the job is not finished)")
IDEMPOTENCY_KEY = Param(
    "header",
    "Idempotency-Key",
    "the same key and body return the same job (else 409)",
    {"type": "string", "minLength": 1, "maxLength": 255},
)


@operation(
    "submitJob",
    "jobs",
    "Submit a job: validates the payload against its type, enqueues it",
    Reply(
        202,
        "accepted: the job, queued",
        Job,
        (LOCATION, Header("Idempotent-Replayed", "`true` when a retry returned the job")),
        # What can be done with the new job next (stateful tests follow these too).
        links=("getJob", "cancelJob", "retryJob"),
    ),
    errors=(BadRequest, Conflict, PayloadTooLarge, ValidationFailed),
    params=(IDEMPOTENCY_KEY,),
    body=SubmitRequest,
)
async def submit_job(request: Request) -> Response:
    svc = services(request)
    tenant = svc.auth.tenant(request)
    await _check_rate(svc, tenant)
    req, job_type, payload = parse_submit(
        await read_json(request, svc.settings.max_body_bytes, svc.settings.body_timeout_s),
        svc.types,
    )
    fields = _new_job(tenant, job_type, req, payload)
    job_id = fields["id"]
    idem = _idempotency(request, svc, tenant, req)
    enqueue = svc.queue.prepare(
        fields["arq_id"], job_id, priority=req.priority.value, tenant=fields["tenant"]
    )
    found, earlier_fingerprint, epoch = await svc.store.create(tenant, fields, idem)
    if earlier_fingerprint is not None:
        return await _replayed(svc, tenant, found, earlier_fingerprint, idem)
    await svc.store.hand_over(tenant, job_id, enqueue)  # failing, it waits for the sweeper
    request.app.state.metrics.submitted.labels(job_type.name).inc()
    # The job is what was just written (its first event is seq 1): no need to read it back.
    snap = to_snapshot({**fields, "seq": 1, "epoch": epoch})
    headers = {"Location": f"/v1/jobs/{job_id}"}
    return JSONResponse(job_body(svc, tenant, snap).model_dump(mode="json"), 202, headers)


def _new_job(
    tenant: str, job_type: JobType[Any], req: SubmitRequest, payload: BaseModel
) -> dict[str, Any]:
    """A new job's fields: queued, its first attempt of its first run."""
    job_id = str(uuid.uuid4())
    return {
        "id": job_id,
        "type": job_type.name,
        "tenant": tenant,
        "status": "queued",
        "payload": payload.model_dump(mode="json"),
        "priority": req.priority.value,
        "attempt": 1,
        "max_attempts": job_type.max_attempts,
        "run": 1,
        "arq_id": new_arq_id(job_id),
        "created_at": time.time(),
        "output": "",
    }


async def _replayed(
    svc: Services,
    tenant: str,
    job_id: str,
    earlier_fingerprint: str,
    idem: tuple[str, str] | None,
) -> Response:
    """The job an earlier request with the same Idempotency-Key created; a Conflict when
    that request was another."""
    assert idem is not None
    if earlier_fingerprint != idem[1]:
        raise Conflict(
            "this Idempotency-Key was used with a different request",
            code="idempotency_key_reused",
        )
    return await _job_response(svc, tenant, job_id, 202, {"Idempotent-Replayed": "true"})


def _idempotency(
    request: Request, svc: Services, tenant: str, req: SubmitRequest
) -> tuple[str, str] | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255:
        raise BadRequest("Idempotency-Key must be 1 to 255 characters", code="bad_idempotency_key")
    digest = hashlib.sha256(key.encode()).hexdigest()
    fingerprint = hashlib.sha256(req.model_dump_json().encode()).hexdigest()[:32]
    return svc.store.keys.idempotency(tenant, digest), fingerprint


async def _job_response(
    svc: Services,
    tenant: str,
    job_id: str,
    status: int,
    headers: dict[str, str],
    model: type[Job] = Job,
) -> Response:
    snap = await get_owned_job(svc, tenant, job_id)
    headers = {"Location": f"/v1/jobs/{job_id}", **headers}
    body = job_body(svc, tenant, snap, model).model_dump(mode="json")
    return await json_response(body, status, headers)


def _job_id_valid(job_id: str) -> bool:
    """A uuid4 as this API writes them: uuid.UUID alone would take other spellings
    (braces, ``urn:uuid:``, no hyphens, capitals, fullwidth digits) of ids never issued."""
    try:
        parsed = uuid.UUID(job_id)
    except ValueError:
        return False
    return parsed.version == 4 and str(parsed) == job_id


def _not_found(job_id: str) -> NotFound:
    # Unknown, expired, or another tenant's: never reveal which.
    return NotFound(f"no job {job_id!r}", code="job_not_found")


async def missing_job(svc: Services, tenant: str, job_id: str) -> ApiError:
    """What to answer for a job the store does not hold: 404, or 503 while the store (on
    a cluster, the tenant's shard) is recovering from a restart or failover (the job's
    worker may still repair it)."""
    if _job_id_valid(job_id) and await svc.store.recovering(tenant):
        return Unavailable(
            "the job store came back from a restart or failover moments ago and may not "
            "hold this job again yet; try again",
            code="state_recovering",
        )
    return _not_found(job_id)


async def get_owned_job(svc: Services, tenant: str, job_id: str) -> JobSnapshot:
    snap = await svc.store.snapshot(job_id, tenant) if _job_id_valid(job_id) else None
    if snap is None:
        raise await missing_job(svc, tenant, job_id)
    return snap


async def not_theirs(svc: Services, tenant: str, job_ids: list[str]) -> str | None:
    """One of ``job_ids`` that is another tenant's (keys.job_tenant), if any: the
    tenant's reads find nothing under its keys, as for a job the store lost, but a
    resume naming it is 404 all the same."""
    owners = await svc.store.tenants_of(job_ids)
    pairs = zip(job_ids, owners, strict=True)
    return next((j for j, owner in pairs if owner is not None and owner != tenant), None)


async def get_owned_head(svc: Services, tenant: str, job_id: str) -> JobHead:
    """As :func:`get_owned_job`, reading only whose the job is and where it stands; for
    the stream endpoints, so it waits at their gate (reads.py) with their other reads."""
    if not _job_id_valid(job_id):
        raise _not_found(job_id)
    _, heads = await svc.reads.heads(tenant, [job_id])
    head = heads[job_id]
    if head is None:
        raise await missing_job(svc, tenant, job_id)
    if head.tenant != tenant:
        raise _not_found(job_id)
    return head


@operation(
    "getJob",
    "jobs",
    "The job's snapshot (the polling fallback)",
    Reply(200, "the snapshot", Job, (ETAG, POLL_HINT)),
    Reply(304, "unchanged since If-None-Match", headers=(ETAG,)),
    errors=(NotFound,),
    params=(Param("header", "If-None-Match", "an earlier ETag: 304 while unchanged"),),
)
async def get_job(request: Request) -> Response:
    svc = services(request)
    tenant = svc.auth.tenant(request)
    snap = await get_owned_job(svc, tenant, request.path_params["job_id"])
    (snap,) = await svc.line.show(tenant, [snap])
    # A queued job's place changes with no event: it is part of the tag.
    place = "" if snap.queue_position is None else f".{snap.queue_position}"
    etag = f'"{snap.seq}.{snap.epoch}{place}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if not snap.status.terminal:
        headers["Retry-After"] = f"{svc.settings.poll_hint_s:g}"
    if etag in _etags(request.headers.get("if-none-match", "")):
        return Response(status_code=304, headers=headers)
    return await json_response(job_body(svc, tenant, snap).model_dump(mode="json"), headers=headers)


def _etags(header: str) -> set[str]:
    return {t.strip().removeprefix("W/") for t in header.split(",") if t.strip()}


class ListQuery(BaseModel):
    status: JobStatus | None = None
    type: str | None = None
    limit: int = 50
    cursor: str | None = None

    @field_validator("limit", mode="before")
    @classmethod
    def _digits(cls, value: object) -> object:
        # pydantic's lax int takes " 5 ", "+5", "5.0" and "1_0"; a query number is
        # ASCII digits, as the document says (and never "３").
        if isinstance(value, str) and not (value.isascii() and value.isdigit()):
            raise ValueError("limit must be a whole number in ASCII digits")
        return value


def _limit_schema(settings: Settings) -> dict[str, Any]:
    most, default = settings.list_limit_max, ListQuery.model_fields["limit"].default
    return {"type": "integer", "minimum": 1, "maximum": most, "default": default}


@operation(
    "listJobs",
    "jobs",
    "The tenant's jobs, newest first",
    Reply(200, "one page", JobPage),
    errors=(BadRequest, ValidationFailed),
    params=(
        Param("query", "status", "only jobs in this state", schema_ref(JobStatus)),
        Param("query", "type", "only jobs of this type"),
        Param("query", "limit", "page size", _limit_schema),
        Param("query", "cursor", "opaque: `next_cursor` of the previous page"),
    ),
)
async def list_jobs(request: Request) -> Response:
    svc = services(request)
    tenant = svc.auth.tenant(request)
    try:
        q = ListQuery.model_validate(dict(request.query_params))
    except ValidationError as exc:
        raise ValidationFailed(
            "bad query parameters", details=validation_details(exc, ("query",))
        ) from exc
    q.cursor = q.cursor or None  # an empty cursor means the first page
    if not 1 <= q.limit <= svc.settings.list_limit_max:
        raise ValidationFailed(f"limit must be 1 to {svc.settings.list_limit_max}")
    jobs, cursor = await listing.list_jobs(
        svc.reads, tenant, limit=q.limit, cursor=q.cursor, status=q.status, type_=q.type
    )
    jobs = await svc.line.show(tenant, jobs)
    page = JobPage(jobs=[job_body(svc, tenant, j) for j in jobs], next_cursor=cursor)
    return await json_response(page.model_dump(mode="json"))


@operation(
    "cancelJob",
    "jobs",
    "Cancel: a queued job never starts, a running one ends `cancelled`",
    Reply(200, "cancelled (it was queued)", Job, (LOCATION,)),
    Reply(
        202,
        "cancel requested (it is running): `cancel_requested` says so",
        CancelRequested,
        (LOCATION,),
    ),
    errors=(NotFound, Conflict),
)
async def cancel_job(request: Request) -> Response:
    svc = services(request)
    tenant = svc.auth.tenant(request)
    job_id = (await get_owned_job(svc, tenant, request.path_params["job_id"])).id
    if await actions.cancel(svc.store, svc.queue, tenant, job_id) == JobStatus.CANCELLED:
        return await _job_response(svc, tenant, job_id, 200, {})
    # Still running until the task is cancelled: say the cancel is under way.
    return await _job_response(svc, tenant, job_id, 202, {}, CancelRequested)


@operation(
    "retryJob",
    "jobs",
    "Run a failed or cancelled job again",
    Reply(202, "queued again", Job, (LOCATION,)),
    errors=(NotFound, Conflict),
)
async def retry_job(request: Request) -> Response:
    svc = services(request)
    tenant = svc.auth.tenant(request)
    snap = await get_owned_job(svc, tenant, request.path_params["job_id"])
    await actions.retry(svc.store, svc.queue, tenant, snap.id, snap.status)
    return await _job_response(svc, tenant, snap.id, 202, {})


@operation(
    "listJobTypes",
    "jobs",
    "The registered job types with their payload JSON Schemas",
    Reply(200, "the types", JobTypes),
)
async def job_types(request: Request) -> Response:
    svc = services(request)
    svc.auth.tenant(request)
    info = [JobTypeInfo.model_construct(**t.describe()) for t in svc.types.types.values()]
    return JSONResponse(JobTypes(types=info).model_dump(mode="json"))


# One route per path (dispatching on the method), so a 405's Allow header lists them all.
routes = [
    Route("/v1/jobs", by_method(POST=submit_job, GET=list_jobs), methods=["GET", "POST"]),
    Route(
        "/v1/jobs/{job_id}", by_method(GET=get_job, DELETE=cancel_job), methods=["GET", "DELETE"]
    ),
    Route("/v1/jobs/{job_id}/retry", retry_job, methods=["POST"]),
    Route("/v1/job-types", job_types, methods=["GET"]),
]
