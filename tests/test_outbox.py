"""The outbox (pushsvc/outbox.py) against a real Redis, and a real API and worker: a new
job's first attempt left in the outbox (its API process died, or Redis failed, between
making the job and queueing it) is queued by the sweeper and runs once; so is a retry
whose hand-over failed; one whose job moved on, or that arq has already, is let go
without queueing it again."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from pushsvc import actions, transitions
from pushsvc.errors import JobError
from pushsvc.keys import Keys
from pushsvc.models import JobStatus
from pushsvc.outbox import Outbox
from pushsvc.publish import Published, Writer
from pushsvc.queue import Queue, new_arq_id
from pushsvc.store import JobStore

from .conftest import TENANTS, open_store, ops_api, settings_for, worker
from .procs import RedisServer

AGO_S = 60  # left this long ago: past any sweep's grace


def new_fields(tenant: str) -> dict[str, Any]:
    """A ticker job as the API makes it (api._new_job)."""
    job_id = str(uuid.uuid4())
    fields = {"id": job_id, "type": "ticker", "tenant": tenant, "status": "queued"}
    fields |= {"payload": {"steps": 2, "interval_ms": 0}, "priority": "normal"}
    fields |= {"attempt": 1, "max_attempts": 3, "run": 1, "arq_id": new_arq_id(job_id)}
    return fields | {"created_at": time.time(), "output": ""}


async def left_long_ago(redis: Redis, keys: Keys, tenant: str, arq_id: str) -> None:
    """Date the attempt's outbox entry AGO_S back (Redis's clock, as lua/create.lua)."""
    seconds, micros = await redis.time()
    ago = int((seconds + micros / 1e6 - AGO_S) * 1000)
    assert await redis.zadd(keys.outbox(tenant), {arq_id: ago}, xx=True, ch=True) == 1


@pytest.fixture(params=["one Redis", "two planes"])
async def parts(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> AsyncIterator[tuple[JobStore, Queue, Outbox]]:
    """The store, the queue and the sweeper: on one Redis, or with the job state on a
    Redis Cluster and the queue on the test Redis (where each hand-over is three calls)."""
    seeds = request.getfixturevalue("data_cluster").seeds if request.param == "two planes" else ""
    async with open_store(redis_server, outbox_sweep_s=5, data_cluster=seeds) as store:
        yield store, store.queue, Outbox(store, store.queue)


async def in_arq(store: JobStore, queue: Queue, arq_id: str) -> bool:
    return await queue.redis.zscore(queue.queue_name, arq_id) is not None


@pytest.mark.timeout(20)
async def test_the_sweeper_queues_what_waited_past_the_grace_once(
    parts: tuple[JobStore, Queue, Outbox],
) -> None:
    store, queue, outbox = parts
    left, fresh = new_fields("u"), new_fields("t")
    for fields in (left, fresh):
        await store.create(fields["tenant"], fields, None)
    await left_long_ago(store.redis, store.keys, "u", left["arq_id"])  # its API died
    assert await outbox.sweep() == 1
    assert await in_arq(store, queue, left["arq_id"])
    assert not await in_arq(store, queue, fresh["arq_id"])  # its own API's to hand over
    assert await store.redis.zcard(store.keys.outbox("u")) == 0
    assert await store.redis.zcard(store.keys.outbox("t")) == 1
    assert await outbox.sweep() == 0 and outbox.swept == 1


@pytest.mark.timeout(20)
async def test_an_attempt_whose_job_moved_on_or_arq_has_is_let_go(
    parts: tuple[JobStore, Queue, Outbox],
) -> None:
    store, queue, outbox = parts
    cancelled, handed, gone = (new_fields("t") for _ in range(3))
    for fields in (cancelled, handed, gone):
        await store.create("t", fields, None)
        await left_long_ago(store.redis, store.keys, "t", fields["arq_id"])
    await actions.cancel(store, queue, "t", cancelled["id"])
    # Handed over, but its API died before taking it out of the outbox.
    assert await queue.hand_over(queue.prepare(handed["arq_id"], handed["id"], tenant="t"))
    await store.redis.delete(store.keys.job("t", gone["id"]))  # expired
    assert await outbox.sweep() == 0
    assert await store.redis.zcard(store.keys.outbox("t")) == 0
    assert not await in_arq(store, queue, cancelled["arq_id"])
    assert not await in_arq(store, queue, gone["arq_id"])
    assert await queue.redis.zcard(queue.queue_name) == 1  # the handed one, once
    snap = await store.snapshot(cancelled["id"], "t")
    assert snap is not None and snap.status == JobStatus.CANCELLED


@pytest.mark.timeout(20)
async def test_after_a_loss_a_pick_restored_without_its_start_is_unmarked(
    parts: tuple[JobStore, Queue, Outbox],
) -> None:
    """A snapshot taken between a worker's pick and its start (a chaos run restored
    one): the job waits, queued, for the attempt arq marks as picked, until the mark
    expires, minutes later. Once the queue's Redis recovered, the sweeper drops the
    mark, unless the attempt holds a lease (a worker runs it), and arq delivers it."""
    store, queue, outbox = parts
    lost, leased = new_fields("t"), new_fields("t")
    for fields in (lost, leased):
        await store.create("t", fields, None)
        enqueue = queue.prepare(fields["arq_id"], fields["id"], tenant="t")
        assert await store.hand_over_now("t", fields["id"], enqueue)
        await queue.redis.set(in_progress_key_prefix + fields["arq_id"], b"1", px=300_000)
    await queue.redis.zadd(store.keys.leases, {leased["arq_id"]: time.time() * 1000 + 60_000})
    assert await outbox.requeue_lost() == 0  # no recovery: nothing to do
    recovered = {"recovered": "e2", "recovered_at": int(time.time())}
    await queue.redis.hset(store.keys.epoch, mapping=recovered)  # type: ignore[arg-type]
    assert await outbox.requeue_lost() == 1
    assert not await queue.redis.exists(in_progress_key_prefix + lost["arq_id"])
    assert await queue.redis.exists(in_progress_key_prefix + leased["arq_id"])
    assert await in_arq(store, queue, lost["arq_id"])  # still queued in arq, delivered next


@pytest.mark.timeout(60)
async def test_a_job_its_api_left_in_the_outbox_runs_once(
    redis_server: RedisServer, redis: Redis
) -> None:
    """An API process's sweeper queues the job another API process made and died before
    queueing; a worker runs it, once."""
    async with ops_api(redis_server, redis, outbox_sweep_s="0.2") as (client, env):
        tenant = TENANTS["key-a"]
        fields = new_fields(tenant)
        await JobStore(redis, settings_for(env)).create(tenant, fields, None)  # the dead API's
        await left_long_ago(redis, client.keys, tenant, fields["arq_id"])
        with worker(env):
            job = await client.wait(fields["id"])
        assert job["status"] == "completed"
        starts = [d for k, d in await client.log(fields["id"]) if d.get("status") == "running"]
        assert len(starts) == 1, starts
        assert await redis.zcard(client.keys.outbox(tenant)) == 0
        metrics = (await client.http.get("/metrics")).text  # the sweeper's, counted
        assert "\npushsvc_outbox_swept_total 1.0\n" in metrics, metrics


@pytest.mark.timeout(60)
async def test_a_job_made_while_the_queue_fails_is_queued_when_it_works_again(
    redis_server: RedisServer, redis: Redis
) -> None:
    """The job is made, the hand-over fails (here: arq's queue key holds a string, so
    the enqueue script errs): the request is still 202 (the job exists), and the
    sweeper queues it once the queue works again."""
    async with ops_api(redis_server, redis, outbox_sweep_s="0.2") as (client, env):
        tenant = TENANTS["key-a"]
        await redis.set(client.keys.queue, "not a sorted set")
        job = await client.submit("ticker", {"steps": 1, "interval_ms": 0})
        members = await redis.zrange(client.keys.outbox(tenant), 0, -1)
        assert [m.decode().split(".")[0] for m in members] == [job["id"]]  # its attempt
        assert (await client.get(job["id"]))["status"] == "queued"
        await redis.delete(client.keys.queue)
        with worker(env):
            assert (await client.wait(job["id"]))["status"] == "completed"
        assert await redis.zcard(client.keys.outbox(tenant)) == 0


@pytest.mark.timeout(20)
async def test_a_late_hand_over_of_an_attempt_that_ran_is_refused(
    parts: tuple[JobStore, Queue, Outbox],
) -> None:
    """arq drops an attempt's record when it ends (pushsvc keeps no arq results), so
    arq's dedup cannot stop a hand-over that comes after: the job's state does."""
    store, queue, _ = parts
    fields = new_fields("t")
    await store.create("t", fields, None)
    enqueue = queue.prepare(fields["arq_id"], fields["id"], tenant="t")
    await store.hand_over("t", fields["id"], enqueue)  # the sweeper's, say
    assert await in_arq(store, queue, fields["arq_id"])
    change = transitions.start(fields, "w1", time.time())
    await transitions.publish(store, fields["id"], "t", change, writer=Writer(fields["arq_id"]))
    await queue.redis.delete(enqueue.key)  # it ran: arq dropped its record ...
    await queue.redis.zrem(queue.queue_name, fields["arq_id"])  # ... and its place
    await store.hand_over("t", fields["id"], enqueue)  # the API's mover, late
    assert not await in_arq(store, queue, fields["arq_id"])
    assert not await queue.redis.exists(enqueue.key)


@pytest.mark.timeout(20)
async def test_a_retry_the_queue_refused_waits_in_the_outbox_for_the_sweeper(
    parts: tuple[JobStore, Queue, Outbox],
) -> None:
    """A change that queues an attempt (here a retry) puts it in the outbox with the
    change and hands it over right after; a hand-over that fails (the queue's Redis
    refuses it) leaves it there, and the sweeper queues it once it is due."""
    store, queue, outbox = parts
    fields = new_fields("t")
    await store.create("t", fields, None)
    await store.hand_over(
        "t", fields["id"], queue.prepare(fields["arq_id"], fields["id"], tenant="t")
    )
    start = transitions.start(fields, "w1", time.time())
    started = await transitions.publish(
        store, fields["id"], "t", start, writer=Writer(fields["arq_id"])
    )
    assert isinstance(started, Published)
    writer = Writer(fields["arq_id"], "w1", started.position)
    await queue.redis.delete(queue.queue_name)
    await queue.redis.set(queue.queue_name, "not a sorted set")  # the queue refuses
    retry_id = new_arq_id(fields["id"])
    enqueue = queue.prepare(retry_id, fields["id"], tenant="t")
    error = JobError("the model went away", code="upstream_error", retryable=True)
    retry = transitions.retry_later(error, 2, retry_id, 0.0, enqueue)
    reply = await transitions.publish(store, fields["id"], "t", retry, writer=writer)
    assert isinstance(reply, Published) and reply.status == JobStatus.QUEUED
    assert await store.redis.zscore(store.keys.outbox("t"), retry_id) is not None
    await queue.redis.delete(queue.queue_name)  # the queue works again
    assert await outbox.sweep() == 0  # not yet due: its caller may still hand it over
    await left_long_ago(store.redis, store.keys, "t", retry_id)
    assert await outbox.sweep() == 1
    assert await in_arq(store, queue, retry_id)
    assert await store.redis.zcard(store.keys.outbox("t")) == 0
