"""The atomic publish path (Lua) and the worker-side throttle, against a real Redis."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from pushsvc.jobs import JobContext
from pushsvc.models import JobStatus
from pushsvc.queue import Queue
from pushsvc.settings import Settings
from pushsvc.store import JobStore, Published, Rejected

from .procs import RedisServer


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[JobStore]:
    settings = Settings(
        redis_url=redis_server.url,
        namespace=f"s{secrets.token_hex(3)}",
        job_ttl_s=600,
        job_log_cap=10,
    )
    redis = Redis.from_url(settings.redis_url)
    yield JobStore(redis, settings)
    await redis.aclose()


async def new_job(store: JobStore, status: str = "running") -> dict[str, Any]:
    job_id = secrets.token_hex(8)
    fields = {
        "id": job_id,
        "type": "ticker",
        "tenant": "t",
        "status": status,
        "payload": {},
        "attempt": 1,
        "max_attempts": 1,
        "run": 1,
        "arq_id": "x",
        "output": "",
        "created_at": time.time(),
    }
    enqueue = Queue(store.redis, store.settings).prepare(fields["arq_id"], job_id)
    assert (await store.create("t", fields, enqueue, None)) == (job_id, None)
    return fields


async def test_publish_bumps_seq_applies_fields_and_logs(store: JobStore) -> None:
    job = await new_job(store)
    reply = await store.publish(job["id"], "t", "progress", {"progress": 5}, {"progress": 5.0})
    assert reply == Published(2, JobStatus.RUNNING, False)
    snap = await store.snapshot(job["id"], "t")
    assert snap is not None and snap.seq == 2 and snap.progress == 5
    events = await store.events_after(job["id"], 0)
    assert events is not None and [e.kind for e in events] == ["snapshot", "progress"]
    assert '"seq":2,' in events[1].data and '"job_id"' in events[1].data


async def test_publish_with_expect_refuses_other_states(store: JobStore) -> None:
    job = await new_job(store, "completed")
    reply = await store.publish(
        job["id"],
        "t",
        "cancelled",
        {},
        {"status": "cancelled"},
        expect=(JobStatus.QUEUED, JobStatus.RUNNING),
    )
    assert reply == Rejected(JobStatus.COMPLETED)
    snap = await store.snapshot(job["id"], "t")
    assert snap is not None and snap.status == "completed" and snap.seq == 1


async def test_unknown_job_publishes_nothing(store: JobStore) -> None:
    assert await store.publish("missing", "t", "progress", {}, {"progress": 1}) is None
    assert not await store.redis.exists(store.keys.job("missing"))


async def test_output_deltas_append_and_everything_expires(store: JobStore) -> None:
    job = await new_job(store)
    for delta in ["Hello", ", ", "wörld"]:
        await store.publish(job["id"], "t", "output", {"delta": delta}, delta=delta)
    snap = await store.snapshot(job["id"], "t")
    assert snap is not None and snap.output == "Hello, wörld"
    for key in (store.keys.job(job["id"]), store.keys.job_log(job["id"])):
        assert 0 < await store.redis.ttl(key) <= 600


async def test_snapshot_of_another_tenant_is_none(store: JobStore) -> None:
    job = await new_job(store)
    assert await store.snapshot(job["id"], "someone-else") is None


async def test_event_log_is_capped_and_reports_trimmed_history(store: JobStore) -> None:
    job = await new_job(store)
    for i in range(300):
        await store.publish(job["id"], "t", "progress", {"progress": i / 3})
    assert await store.redis.xlen(store.keys.job_log(job["id"])) < 300
    assert await store.events_after(job["id"], 1) is None  # seq 2 is gone
    recent = await store.events_after(job["id"], 299)
    assert recent is not None and len(recent) == 2


async def test_throttle_merges_progress_and_loses_no_output(store: JobStore) -> None:
    job = await new_job(store)
    ctx = JobContext(store, job, rate_hz=10)
    text = []
    started = time.monotonic()
    for i in range(5000):
        await ctx.progress(i / 50)
        await ctx.output(f"{i} ")
        text.append(f"{i} ")
    await ctx.flush()
    await ctx.close()
    flushes_allowed = (time.monotonic() - started) * 10 + 2
    events = await store.events_after(job["id"], 1)
    assert events is not None
    assert len(events) <= 2 * flushes_allowed  # each flush: one progress, one output
    snap = await store.snapshot(job["id"], "t")
    assert snap is not None and snap.output == "".join(text)
    assert snap.progress == pytest.approx(4999 / 50)


async def test_progress_never_decreases_within_an_attempt(store: JobStore) -> None:
    job = await new_job(store)
    ctx = JobContext(store, job, rate_hz=1000)
    for pct in [10, 50, 20, 120, -5]:
        await ctx.progress(pct)
    await ctx.flush()
    snap = await store.snapshot(job["id"], "t")
    assert snap is not None and snap.progress == 100


async def test_a_superseded_attempt_cannot_write(store: JobStore) -> None:
    job = await new_job(store)
    reply = await store.publish(
        job["id"],
        "t",
        "progress",
        {"progress": 9},
        {"progress": 9.0},
        expect=(JobStatus.RUNNING,),
        arq_id="someone-else",
    )
    assert reply == Rejected(JobStatus.RUNNING)
    snap = await store.snapshot(job["id"], "t")
    assert snap is not None and snap.progress == 0


async def test_lease_is_taken_on_start_and_dropped_on_leaving_running(store: JobStore) -> None:
    job = await new_job(store, "queued")
    leases, arq_id = store.keys.leases, job["arq_id"]
    await store.publish(
        job["id"],
        "t",
        "status",
        {"status": "running"},
        {"status": "running"},
        expect=(JobStatus.QUEUED,),
        arq_id=arq_id,
        lease_until_ms=123456,
    )
    assert await store.redis.zscore(leases, arq_id) == 123456
    await store.publish(
        job["id"],
        "t",
        "completed",
        {},
        {"status": "completed"},
        expect=(JobStatus.RUNNING,),
        arq_id=arq_id,
    )
    assert await store.redis.zscore(leases, arq_id) is None


async def test_create_enqueues_in_the_same_write(store: JobStore) -> None:
    job = await new_job(store, "queued")
    queue = Queue(store.redis, store.settings)
    assert await store.redis.zscore(queue.queue_name, job["arq_id"]) is not None
    assert json.loads(await store.redis.get(f"arq:job:{job['arq_id']}"))["a"] == [job["id"]]
