"""The API's own state changes (pushsvc/actions.py), against a real Redis: cancel of a
queued job, a new run of a failed one, the conflicts and 404s they answer; and stop is
not disconnect (a dropped stream never cancels, DELETE on any API process does)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from pushsvc import actions
from pushsvc.errors import Conflict, NotFound
from pushsvc.models import JobStatus
from pushsvc.queue import Queue
from pushsvc.store import JobStore

from .conftest import open_store
from .procs import Api, RedisServer
from .sse import Event, Stream, assert_gap_free, events, read


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
    await store.create("t", fields, None)
    await queue.hand_over(queue.prepare(fields["arq_id"], job_id, tenant="t"))  # as the API
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
    fields = await store.load("t", job_id)
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


# -- stop is not disconnect (the contract's promise) ----------------------------------


@pytest.mark.timeout(60)
async def test_a_dropped_stream_never_cancels_and_delete_on_any_api_process_does(
    stack: dict[str, Any],
) -> None:
    """A client that goes away (a closed tab) leaves its job running; DELETE, sent to
    another API process than the one streaming, cancels it, and the stream says so."""
    second = Api([], stack["env"]).start()
    auth = {"Authorization": "Bearer key-a"}
    try:
        async with (
            httpx.AsyncClient(base_url=stack["api"].url, headers=auth, timeout=10) as first_api,
            httpx.AsyncClient(base_url=second.url, headers=auth, timeout=10) as second_api,
        ):
            payload = {"steps": 400, "interval_ms": 50}
            job = await first_api.post("/v1/jobs", json={"type": "ticker", "payload": payload})
            job_id, path = job.json()["id"], f"/v1/jobs/{job.json()['id']}/events"
            dropped = await read(first_api, path, stop=lambda s: _progress(s.events) >= 2)
            resumed, deleted = Stream(), False
            async with asyncio.timeout(40):
                headers = {"Last-Event-ID": dropped.resume_id}
                async for event in events(second_api, path, headers=headers):
                    resumed.events.append(event)
                    # Once it went on after the drop, one DELETE, on the other process.
                    if _progress(resumed.events) >= 3 and not deleted:
                        resp = await first_api.delete(f"/v1/jobs/{job_id}")
                        assert resp.status_code == 202, resp.text
                        assert resp.json()["cancel_requested"]
                        deleted = True
            assert deleted, "the job ended before it was cancelled"  # the drop cancelled it?
            assert resumed.events[-1].kind == "cancelled"
            assert resumed.events[0].data["seq"] == dropped.events[-1].data["seq"] + 1
            assert_gap_free(resumed, job_id)
            final = (await second_api.get(f"/v1/jobs/{job_id}")).json()
            assert final["status"] == "cancelled" and 0 < final["progress"] < 100
    finally:
        second.stop()


def _progress(evs: list[Event]) -> int:
    return sum(e.kind == "progress" for e in evs)
