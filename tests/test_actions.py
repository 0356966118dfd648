"""The API's own state changes (pushsvc/actions.py), against a real Redis: cancel of a
queued job, a new run of a failed one, and the conflicts and 404s they answer."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pushsvc import actions
from pushsvc.errors import Conflict, NotFound
from pushsvc.models import JobStatus
from pushsvc.queue import Queue
from pushsvc.store import JobStore

from .conftest import open_store
from .procs import RedisServer


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[JobStore]:
    async with open_store(redis_server) as opened:
        yield opened


async def new_job(store: JobStore, status: str) -> tuple[str, Queue]:
    job_id = secrets.token_hex(8)
    fields: dict[str, Any] = {
        "id": job_id,
        "type": "ticker",
        "tenant": "t",
        "status": status,
        "payload": {},
        "attempt": 1,
        "max_attempts": 1,
        "run": 1,
        "arq_id": f"{job_id}.1",
        "priority": "normal",
        "output": "",
        "created_at": time.time(),
    }
    queue = Queue(store.redis, store.settings)  # type: ignore[arg-type]
    await store.create("t", fields, queue.prepare(fields["arq_id"], job_id, tenant="t"), None)
    return job_id, queue


@pytest.mark.timeout(20)
async def test_a_queued_job_is_cancelled_and_leaves_the_queue(store: JobStore) -> None:
    job_id, queue = await new_job(store, "queued")
    assert await store.redis.zscore(queue.queue_name, f"{job_id}.1") is not None
    assert await actions.cancel(store, queue, "t", job_id) is JobStatus.CANCELLED
    snap = await store.snapshot(job_id, "t")
    assert snap is not None and snap.status is JobStatus.CANCELLED
    assert await store.redis.zscore(queue.queue_name, f"{job_id}.1") is None


@pytest.mark.timeout(20)
async def test_a_finished_job_cannot_be_cancelled(store: JobStore) -> None:
    job_id, queue = await new_job(store, "completed")
    with pytest.raises(Conflict) as refused:
        await actions.cancel(store, queue, "t", job_id)
    assert refused.value.details == {"status": "completed"}


@pytest.mark.timeout(20)
async def test_a_failed_job_runs_again_but_a_queued_one_does_not(store: JobStore) -> None:
    job_id, queue = await new_job(store, "failed")
    await actions.retry(store, queue, "t", job_id, JobStatus.FAILED)
    fields = await store.load(job_id)
    assert fields is not None and fields["status"] == "queued" and fields["run"] == 2
    with pytest.raises(Conflict):
        await actions.retry(store, queue, "t", job_id, JobStatus.QUEUED)


@pytest.mark.timeout(20)
async def test_another_tenants_job_is_not_found(store: JobStore) -> None:
    job_id, queue = await new_job(store, "queued")
    with pytest.raises(NotFound):
        await actions.cancel(store, queue, "other", job_id)
    assert actions.wrong_state(JobStatus.FAILED, "cancel").message == (
        "cannot cancel a job that is failed"
    )
