"""Bulk reads of stored state: a few at a time per API process, and one snapshot read
per job shared by the streams that ask for it together.

An API process has a pool of ``PUSHSVC_REDIS_POOL_SIZE`` connections (2) for everything.
Hundreds of streams opening or resyncing at once, each reading a snapshot (megabytes,
for a job with a long output) or replaying a log, used to take the whole pool: requests
waited past the pool's timeout (503s), and so did streams whose response had started
(aborted). Now those reads, and the listing's scans, pass a gate of
``PUSHSVC_BULK_READ_CONCURRENCY`` (1) and wait their turn there, without a timeout, so
other requests always find a connection.

While a job's snapshot read waits at the gate, every stream of that job that asks for
the job joins it: one read, one decoding, and one encoding of each frame sent (see
``StoredJob.frames``). A stream only joins a read that has not been sent yet, so the
read is newer than anything the stream already relies on (its confirmed subscription,
or the overflow it resyncs from); once sent, later askers wait for a read of their own.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, field
from typing import Any

from .epoch import StreamPosition
from .fields import to_snapshot
from .frames import Frame
from .models import JobSnapshot
from .settings import Settings
from .store import JobHead, JobStore


@dataclass(eq=False)
class StoredJob:
    """One read of a job (its snapshot and last logged event), shared by the streams that
    asked at once; ``frames`` holds what they send of it (streams.py), encoded once."""

    tenant: str
    snap: JobSnapshot
    last: Frame | None
    frames: dict[bool, list[Frame]] = field(default_factory=dict)  # by ``reset``


class BulkReads:
    """The gate and the shared snapshot reads of one API process (owned by the lifespan)."""

    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store = store
        self._gate = asyncio.Semaphore(settings.bulk_read_concurrency)
        # Reads not sent yet, by (tenant, job id).
        self._boarding: dict[tuple[str, str], asyncio.Task[StoredJob | None]] = {}
        self._flights: set[asyncio.Task[StoredJob | None]] = set()
        # The latest read of each job, while a stream still sends it (weak: no longer).
        self._recent: weakref.WeakValueDictionary[tuple[str, str], StoredJob] = (
            weakref.WeakValueDictionary()
        )
        self.reads = 0  # snapshot reads sent (metrics)
        self.joined = 0  # snapshot reads a stream joined instead

    async def __aenter__(self) -> BulkReads:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        for flight in list(self._flights):
            flight.cancel()
        await asyncio.gather(*self._flights, return_exceptions=True)

    async def job(self, tenant: str, job_id: str) -> StoredJob | None:
        """The tenant's job as stored now (None: unknown), read after this call began."""
        key = (tenant, job_id)
        flight = self._boarding.get(key)
        if flight is None:
            flight = asyncio.create_task(self._read_job(key), name="pushsvc-read")
            self._boarding[key] = flight
            self._flights.add(flight)
            flight.add_done_callback(self._landed)
        else:
            self.joined += 1
        # shield: a stream that leaves does not cancel the read for the others.
        return await asyncio.shield(flight)

    async def _read_job(self, key: tuple[str, str]) -> StoredJob | None:
        try:
            async with self._gate:
                self._close_boarding(key)  # sent from here on: later askers read anew
                self.reads += 1
                found = await self.store.load_with_last(*key)
        finally:
            self._close_boarding(key)
        if found is None:
            return None
        fields, last = found
        stored = StoredJob(fields.get("tenant", ""), to_snapshot(fields), last)
        self._recent[key] = stored
        return stored

    def recent(self, tenant: str, job_id: str) -> StoredJob | None:
        """The job's latest read that a stream is still sending, if any (no I/O: it may
        be older than the store; see JobStream._fresh)."""
        return self._recent.get((tenant, job_id))

    def _close_boarding(self, key: tuple[str, str]) -> None:
        if self._boarding.get(key) is asyncio.current_task():
            del self._boarding[key]

    def _landed(self, flight: asyncio.Task[StoredJob | None]) -> None:
        self._flights.discard(flight)
        if not flight.cancelled():
            flight.exception()  # seen, when every stream that asked has left

    # The other reads only pass the gate: each caller's own (positions differ).

    async def events_after(
        self, tenant: str, job_id: str, after: StreamPosition, limit: int
    ) -> tuple[list[Frame], str] | None:
        async with self._gate:
            return await self.store.events_after(tenant, job_id, after, limit)

    async def tenant_events_after(
        self, tenant: str, after: StreamPosition, limit: int
    ) -> tuple[list[Frame], str] | None:
        async with self._gate:
            return await self.store.tenant_events_after(tenant, after, limit)

    async def read_view(
        self, tenant: str, job_ids: list[str], recent: int, *, since_epoch: str = ""
    ) -> tuple[StreamPosition, dict[str, dict[str, Any] | None]]:
        async with self._gate:
            return await self.store.read_view(tenant, job_ids, recent, since_epoch=since_epoch)

    async def heads(
        self, tenant: str, job_ids: list[str]
    ) -> tuple[StreamPosition, dict[str, JobHead | None]]:
        async with self._gate:
            return await self.store.heads(tenant, job_ids)

    async def last_event(self, tenant: str, job_id: str) -> Frame | None:
        async with self._gate:
            return await self.store.last_event(tenant, job_id)

    async def load_many(self, tenant: str, job_ids: list[str]) -> list[dict[str, Any] | None]:
        async with self._gate:
            return await self.store.load_many(tenant, job_ids)

    async def scan_index(
        self, tenant: str, max_score: int, window: tuple[int, int], filters: tuple[str, str]
    ) -> tuple[int, list[tuple[str, int]], list[str]]:
        async with self._gate:
            return await self.store.scan_index(tenant, max_score, window, filters)
