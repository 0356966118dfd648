"""The job listing (pushsvc/listing.py) against a real Redis: filters checked in Redis,
pages and cursors across its batches, expired jobs pruned."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pushsvc import listing
from pushsvc.models import JobStatus
from pushsvc.reads import BulkReads
from pushsvc.store import JobStore

from .conftest import open_store
from .procs import RedisServer


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[JobStore]:
    async with open_store(redis_server) as opened:
        yield opened


async def add_jobs(store: JobStore, n: int) -> list[dict[str, Any]]:
    """``n`` jobs of tenant t, three to a millisecond (equal scores), oldest first; every
    7th failed, every 5th of type "other"."""
    base, jobs = time.time() - 60, []
    for i in range(n):
        fields = {
            "id": f"{i:04d}-{'x' * 8}",
            "type": "other" if i % 5 == 0 else "ticker",
            "tenant": "t",
            "status": "failed" if i % 7 == 0 else "completed",
            "payload": {},
            "attempt": 1,
            "max_attempts": 1,
            "run": 1,
            "arq_id": f"{i}.a",
            "output": "o" * 100,
            "created_at": base + (i // 3) / 1000,
        }
        await store.create("t", fields, None)
        jobs.append(fields)
    return jobs


def newest_first(jobs: list[dict[str, Any]]) -> list[str]:
    # The index orders equal scores by id, newest (largest) first.
    return [j["id"] for j in sorted(jobs, key=lambda j: (j["created_at"], j["id"]), reverse=True)]


async def list_all(reads: BulkReads, limit: int, **filters: Any) -> list[str]:
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = await listing.list_jobs(reads, "t", limit=limit, cursor=cursor, **filters)
        seen += [j.id for j in page]
        assert len(page) <= limit
        if cursor is None:
            return seen


@pytest.mark.timeout(30)
async def test_filters_and_pages_across_batches_read_only_the_matches(
    store: JobStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jobs = await add_jobs(store, 120)
    monkeypatch.setattr(listing, "FILTER_BATCH", 16)  # many batches, pages across them
    loaded: list[str] = []
    load_many = store.load_many

    async def counted(tenant: str, job_ids: list[str]) -> list[dict[str, Any] | None]:
        loaded.extend(job_ids)
        return await load_many(tenant, job_ids)

    monkeypatch.setattr(store, "load_many", counted)
    reads = BulkReads(store, store.settings)
    failed = [j for j in jobs if j["status"] == "failed"]
    assert await list_all(reads, 4, status=JobStatus.FAILED) == newest_first(failed)
    assert sorted(loaded) == sorted(j["id"] for j in failed)  # only the matches, whole
    other = [j for j in jobs if j["type"] == "other"]
    assert await list_all(reads, 5, type_="other") == newest_first(other)
    both = [j for j in failed if j["type"] == "other"]
    assert await list_all(reads, 2, status=JobStatus.FAILED, type_="other") == newest_first(both)
    assert await list_all(reads, 7) == newest_first(jobs)
    assert await list_all(reads, 50, type_="nonexistent") == []


@pytest.mark.timeout(30)
async def test_expired_jobs_are_pruned_from_the_index(store: JobStore) -> None:
    jobs = await add_jobs(store, 10)
    gone = [jobs[2]["id"], jobs[5]["id"]]
    await store.redis.delete(*(store.keys.job(jobs[0]["tenant"], j) for j in gone))
    reads = BulkReads(store, store.settings)
    kept = [j for j in jobs if j["id"] not in gone]
    assert await list_all(reads, 3, type_="ticker") == newest_first(
        [j for j in kept if j["type"] == "ticker"]
    )
    index = store.keys.tenant_index("t")
    assert [await store.redis.zscore(index, j) for j in gone] == [None, None]
