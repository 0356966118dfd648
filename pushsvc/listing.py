"""``GET /v1/jobs``: a tenant's jobs, newest first, filtered, a page at a time."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from .errors import BadRequest
from .fields import to_snapshot
from .models import JobSnapshot, JobStatus
from .reads import BulkReads

# Index entries a filtered listing checks per round trip (status and type alone, in
# Redis): 4,000 jobs are 8 short scripts, not 4,000 whole jobs read one after another.
FILTER_BATCH = 500

Entry = tuple[str, int]  # a job id and its score (creation time, ms) in the tenant index


async def list_jobs(
    reads: BulkReads,
    tenant: str,
    *,
    limit: int,
    cursor: str | None = None,
    status: JobStatus | None = None,
    type_: str | None = None,
) -> tuple[list[JobSnapshot], str | None]:
    """The page and the next cursor. Redis checks the filter on each job's status and
    type (lua/scan.lua); only matching jobs are read whole, a page's worth at a time.
    Both are bulk reads: they wait their turn at the gate (reads.py)."""
    after = None if cursor is None else _decode_cursor(cursor)
    # A fixed upper bound keeps offsets stable while newer jobs are being added.
    max_score = int(time.time() * 1000) + 1 if after is None else after[0]
    filters = (status or "", type_ or "")
    page: list[JobSnapshot] = []
    stale: list[str] = []
    offset, batch = 0, FILTER_BATCH if any(filters) else max(limit * 2, 50)
    try:
        while True:
            scanned, matches, gone = await reads.scan_index(
                tenant, max_score, (offset, batch), filters
            )
            if not scanned:
                return page, None
            offset += scanned
            stale += gone
            todo = _unserved(matches, after)
            last = await _fill(reads, tenant, page, todo, (limit, filters), stale)
            if last is not None:
                return page, _encode_cursor(last[1], last[0])
    finally:
        if stale:  # expired jobs: prune the index lazily
            await reads.store.redis.zrem(reads.store.keys.tenant_index(tenant), *stale)


def _unserved(entries: list[Entry], after: tuple[int, str] | None) -> list[Entry]:
    if after is None:
        return entries
    # Equal scores come in reverse id order: skip those already served.
    return [(j, s) for j, s in entries if not (s == after[0] and j >= after[1])]


async def _fill(
    reads: BulkReads,
    tenant: str,
    page: list[JobSnapshot],
    entries: list[Entry],
    wanted: tuple[int, tuple[str, str]],
    stale: list[str],
) -> Entry | None:
    """Read the tenant's ``entries`` whole, as many at a time as the page still needs
    (``wanted``: the page's size and filters), into ``page``; the entry that filled it,
    if one did."""
    limit, filters = wanted
    while entries:
        todo, entries = entries[: limit - len(page)], entries[limit - len(page) :]
        found = await reads.load_many(tenant, [j for j, _ in todo])
        for entry, fields in zip(todo, found, strict=True):
            if fields is None:
                stale.append(entry[0])
            elif _matches(fields, *filters):  # again: it may have moved on since
                page.append(to_snapshot(fields))
                if len(page) == limit:
                    return entry
    return None


def _matches(fields: dict[str, Any], status: str, type_: str) -> bool:
    return (not status or fields["status"] == status) and (not type_ or fields["type"] == type_)


def _encode_cursor(score: int, job_id: str) -> str:
    raw = json.dumps([score, job_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


CURSOR_MAX = 200  # characters: what _encode_cursor makes is about 80


def _decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        if len(cursor) > CURSOR_MAX:  # nothing this API issued; nor JSON nested 1,000 deep
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        score, job_id = json.loads(raw)
        # ``type(...) is int``: JSON's true is an int to isinstance, and Redis refuses it.
        if type(score) is not int or not 0 <= score < 2**53 or not isinstance(job_id, str):
            raise ValueError(cursor)
    except (ValueError, TypeError, RecursionError) as exc:
        raise BadRequest("cursor is not one this API issued", code="bad_cursor") from exc
    return score, job_id
