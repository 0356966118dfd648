"""Leases and the reaper (pushsvc/leases.py), against a real Redis: a lapsed lease of a
job on its last attempt fails it with ``worker_lost``; a lease with no job is dropped."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from arq.constants import in_progress_key_prefix

from pushsvc.errors import JobError
from pushsvc.leases import Leases
from pushsvc.queue import Queue
from pushsvc.store import JobStore
from pushsvc.transitions import Transition

from .conftest import open_store
from .procs import RedisServer


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[JobStore]:
    async with open_store(redis_server, lease_s=3) as opened:
        yield opened


async def never_requeue(fields: dict[str, Any], exc: JobError) -> Transition:
    raise AssertionError("a last attempt is not requeued")


def leases_of(store: JobStore) -> Leases:
    queue = Queue(store.redis, store.settings)  # type: ignore[arg-type]
    return Leases(store.settings, store, queue, {}, never_requeue)


@pytest.mark.timeout(10)
async def test_a_lease_lapses_lease_s_from_now(store: JobStore) -> None:
    before = time.time() * 1000
    deadline = leases_of(store).deadline()
    assert before + 3000 <= deadline <= time.time() * 1000 + 3000


@pytest.mark.timeout(20)
@pytest.mark.parametrize("named", [True, False], ids=["named", "its-name-expired"])
async def test_a_lapsed_last_attempt_fails_as_worker_lost(store: JobStore, named: bool) -> None:
    """Found by the job's tenant name (keys.job_tenant), or, when that expired (an
    attempt that ran longer than the jobs' TTL), by its arq job's arguments."""
    job_id = secrets.token_hex(8)
    arq_id = f"{job_id}.1"
    fields = {
        "id": job_id,
        "type": "ticker",
        "tenant": "t",
        "status": "running",
        "payload": {},
        "attempt": 1,
        "max_attempts": 1,
        "run": 1,
        "arq_id": arq_id,
        "priority": "normal",
        "output": "",
        "created_at": time.time(),
    }
    queue = Queue(store.redis, store.settings)  # type: ignore[arg-type]
    await store.create("t", fields, None)
    await queue.hand_over(queue.prepare(arq_id, job_id, tenant="t"))  # as the API does
    if not named:
        assert await store.redis.delete(store.keys.job_tenant(job_id)) == 1
    gone = f"{secrets.token_hex(8)}.1"
    await store.redis.zadd(store.keys.leases, {arq_id: 1, gone: 1})
    assert await leases_of(store).reap() == 1
    snap = await store.snapshot(job_id, "t")
    assert snap is not None and snap.status == "failed"
    assert snap.error is not None and snap.error.code == "worker_lost"
    assert await store.redis.zscore(store.keys.leases, gone) is None
    assert await store.redis.zscore(store.keys.leases, arq_id) is None  # after the failure


@pytest.mark.timeout(20)
async def test_a_lapsed_lease_of_an_attempt_that_never_started_is_only_dropped(
    store: JobStore,
) -> None:
    """A worker takes an attempt's lease before its start transition; one that died
    between left a lease whose job still waits for that attempt: the reaper lets the
    lease go and leaves the job alone, and drops arq's mark of the pick, so that arq
    delivers the attempt again now, not once the mark expires (minutes)."""
    job_id = secrets.token_hex(8)
    arq_id = f"{job_id}.1"
    fields = {
        "id": job_id, "type": "ticker", "tenant": "t", "status": "queued", "payload": {},
        "attempt": 1, "max_attempts": 1, "run": 1, "arq_id": arq_id, "priority": "normal",
        "output": "", "created_at": time.time(),
    }  # fmt: skip
    queue = Queue(store.redis, store.settings)  # type: ignore[arg-type]
    await store.create("t", fields, None)
    await queue.hand_over(queue.prepare(arq_id, job_id, tenant="t"))
    await store.redis.zadd(store.keys.leases, {arq_id: 1})
    picked = in_progress_key_prefix + arq_id
    await store.redis.set(picked, b"1", px=300_000)  # arq's mark: the dead worker's pick
    assert await leases_of(store).reap() == 0
    assert not await store.redis.exists(picked)
    snap = await store.snapshot(job_id, "t")
    assert snap is not None and snap.status == "queued" and snap.seq == 1
    assert await store.redis.zscore(store.keys.leases, arq_id) is None
    assert await store.redis.zscore(queue.queue_name, arq_id) is not None  # still arq's
