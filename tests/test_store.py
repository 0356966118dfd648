"""The job store and its atomic publish path (Lua), against a real Redis."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from pushsvc.connections import make_pool
from pushsvc.epoch import StreamPosition
from pushsvc.models import JobStatus
from pushsvc.publish import Diverged, PublishCall, Published, Rejected, Writer
from pushsvc.queue import Queue
from pushsvc.store import JobStore

from .conftest import noted_run_id, open_store
from .procs import RedisServer


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[JobStore]:
    async with open_store(redis_server, job_ttl_s=600, job_log_cap=10) as opened:
        yield opened


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
    created = await store.create("t", fields, None)
    assert created[:2] == (job_id, None) and created.epoch
    return fields


async def test_publish_bumps_seq_applies_fields_and_logs(store: JobStore) -> None:
    job = await new_job(store)
    reply = await store.publish(job["id"], "t", "progress", {"progress": 5}, {"progress": 5.0})
    assert isinstance(reply, Published) and reply.epoch
    assert (reply.seq, reply.status, reply.cancel_requested) == (2, JobStatus.RUNNING, False)
    snap = await store.snapshot(job["id"], "t")
    assert snap is not None and snap.seq == 2 and snap.progress == 5
    assert snap.epoch == reply.epoch
    found = await store.events_after("t", job["id"], StreamPosition(0))
    assert found is not None and found[1] == reply.epoch
    events = found[0]
    assert [e.kind for e in events] == ["snapshot", "progress"]
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
    assert not await store.redis.exists(store.keys.job("t", "missing"))


async def test_output_deltas_append_and_everything_expires(store: JobStore) -> None:
    job = await new_job(store)
    for delta in ["Hello", ", ", "wörld"]:
        await store.publish(job["id"], "t", "output", {"delta": delta}, delta=delta)
    snap = await store.snapshot(job["id"], "t")
    assert snap is not None and snap.output == "Hello, wörld"
    for key in (store.keys.job("t", job["id"]), store.keys.job_log("t", job["id"])):
        assert 0 < await store.redis.ttl(key) <= 600


async def test_snapshot_of_another_tenant_is_none(store: JobStore) -> None:
    job = await new_job(store)
    assert await store.snapshot(job["id"], "someone-else") is None


async def test_event_log_is_capped_and_reports_trimmed_history(store: JobStore) -> None:
    job = await new_job(store)
    for i in range(300):
        await store.publish(job["id"], "t", "progress", {"progress": i / 3})
    assert await store.redis.xlen(store.keys.job_log("t", job["id"])) < 300
    assert await store.events_after("t", job["id"], StreamPosition(1)) is None  # seq 2 is gone
    recent = await store.events_after("t", job["id"], StreamPosition(299))
    assert recent is not None and len(recent[0]) == 2


async def test_a_superseded_attempt_cannot_write(store: JobStore) -> None:
    job = await new_job(store)
    reply = await store.publish(
        job["id"],
        "t",
        "progress",
        {"progress": 9},
        {"progress": 9.0},
        expect=(JobStatus.RUNNING,),
        writer=Writer("someone-else"),
    )
    assert reply == Rejected(JobStatus.RUNNING)
    snap = await store.snapshot(job["id"], "t")
    assert snap is not None and snap.progress == 0


async def test_a_new_jobs_attempt_waits_in_the_outbox_and_is_handed_over_once(
    store: JobStore,
) -> None:
    """create() leaves the first attempt in the tenant's outbox (the queue may be another
    Redis); handing it to arq twice queues it once (arq's job-id dedup, while arq holds
    the attempt or keeps its result), and its arq job names the job and its tenant."""
    job = await new_job(store, "queued")
    queue, arq_id = Queue(store.redis, store.settings), job["arq_id"]
    seconds, _ = await store.redis.time()
    at = await store.redis.zscore(store.keys.outbox("t"), arq_id)  # Redis's time, ms
    assert at is not None and abs(at / 1000 - seconds) < 5
    assert await store.redis.sismember(store.keys.tenants, "t")  # the sweeper's list
    assert await store.redis.zscore(queue.queue_name, arq_id) is None
    enqueue = queue.prepare(arq_id, job["id"], tenant="t")
    assert await queue.hand_over(enqueue) and not await queue.hand_over(enqueue)
    assert await store.redis.zcard(queue.queue_name) == 1
    arq_job = json.loads(await store.redis.get(f"arq:job:{arq_id}"))
    assert arq_job["a"] == [job["id"], "t"]  # and its tenant: its keys' tag
    await store.redis.delete(f"arq:job:{arq_id}")
    await store.redis.set(f"arq:result:{arq_id}", "{}")  # it ran; arq kept its result
    assert not await queue.hand_over(enqueue)


# -- positions and epochs (see ARCHITECTURE.md "Positions, epochs and recovery") ------


def writer_at(reply: object, owner: str = "") -> Writer:
    assert isinstance(reply, Published)
    return Writer("x", owner, reply.position)


async def test_a_new_store_epoch_gives_the_next_write_a_new_job_and_tenant_epoch(
    store: JobStore,
) -> None:
    job = await new_job(store)
    first = await store.publish(job["id"], "t", "progress", {"progress": 1})
    tenant_before = await store.redis.hget(store.keys.tenant_position("t"), "epoch")
    await store.redis.hset(store.keys.tenant_epoch("t"), "id", "elsewhere")  # a restart
    second = await store.publish(job["id"], "t", "progress", {"progress": 2})
    assert isinstance(first, Published) and isinstance(second, Published)
    assert second.seq == first.seq + 1 and second.epoch != first.epoch
    assert await store.redis.hget(store.keys.tenant_position("t"), "epoch") != tenant_before
    assert await store.events_after("t", job["id"], first.position) is None  # another history
    found = await store.events_after("t", job["id"], second.position)
    assert found == ([], second.epoch)


async def test_a_position_ahead_of_the_store_cannot_resume(store: JobStore) -> None:
    job = await new_job(store)
    reply = await store.publish(job["id"], "t", "progress", {"progress": 1})
    assert isinstance(reply, Published)
    ahead = StreamPosition(reply.seq + 5, reply.epoch)  # the store was rewound
    assert await store.events_after("t", job["id"], ahead) is None
    assert await store.events_after("t", job["id"], StreamPosition(reply.seq + 5)) is None


async def test_a_writer_whose_history_the_store_lost_is_told_to_repair(store: JobStore) -> None:
    job = await new_job(store)
    reply = await store.publish(job["id"], "t", "progress", {"progress": 1})
    writer = writer_at(reply)
    rewound = Writer("x", "", StreamPosition(writer.known.seq + 3, writer.known.epoch))  # type: ignore[union-attr]
    refused = await store.publish(job["id"], "t", "progress", {"progress": 2}, writer=rewound)
    assert isinstance(refused, Diverged) and refused.position == writer.known
    await store.redis.delete(store.keys.job("t", job["id"]))
    assert await store.publish(job["id"], "t", "progress", {}, writer=writer) is None


async def test_repair_rewrites_the_job_under_a_new_epoch_unless_superseded(
    store: JobStore,
) -> None:
    job = await new_job(store)
    await store.redis.hset(store.keys.job("t", job["id"]), "owner", "me")
    reply = await store.publish(job["id"], "t", "output", {"delta": "ab"}, delta="ab")
    writer = writer_at(reply, "me")
    await store.redis.delete(store.keys.job("t", job["id"]), store.keys.job_output("t", job["id"]))
    fields = {k: job[k] for k in ("id", "type", "tenant", "payload", "attempt", "max_attempts")}
    call = PublishCall(
        job["id"], "t", "snapshot", {"reset": True},
        {**fields, "status": "running", "owner": "me", "arq_id": "x", "created_at": 1.0,
         "output": ""},
        delta="abcd", writer=writer, index_score=1000,
    )  # fmt: skip
    repaired = await store.repair(call)
    assert isinstance(repaired, Published) and repaired.epoch != writer.known.epoch  # type: ignore[union-attr]
    assert repaired.seq > writer.known.seq  # type: ignore[union-attr]
    snap = await store.snapshot(job["id"], "t")
    assert snap is not None and snap.output == "abcd" and snap.status == "running"
    assert await store.redis.zscore(store.keys.tenant_index("t"), job["id"]) == 1000
    # The store is current and another worker owns the attempt now: refused.
    await store.redis.hset(store.keys.job("t", job["id"]), "owner", "someone-else")
    assert await store.repair(call) == Rejected(JobStatus.RUNNING)


async def test_a_tenant_sequence_created_anew_starts_a_new_tenant_history(
    store: JobStore,
) -> None:
    job = await new_job(store)
    await store.publish(job["id"], "t", "progress", {"progress": 1})
    before = await store.redis.hgetall(store.keys.tenant_position("t"))
    await store.redis.delete(store.keys.tenant_position("t"))  # what expiry does
    await store.publish(job["id"], "t", "progress", {"progress": 2})
    after = await store.redis.hgetall(store.keys.tenant_position("t"))
    assert after[b"seq"] == b"1" and after[b"epoch"] != before[b"epoch"]
    assert await store.redis.xlen(store.keys.tenant_log("t")) == 1  # the old log is gone
    found = await store.tenant_events_after("t", StreamPosition(0, after[b"epoch"].decode()))
    assert found is not None and [f.kind for f in found[0]] == ["progress"]


async def test_every_new_connection_checks_the_store_epoch(
    redis_server: RedisServer, store: JobStore
) -> None:
    """A server with another run id than the one recorded (a restart, a failover) gets a
    new store epoch before a connection's first command."""
    settings = store.settings
    pool = make_pool(settings)
    client = Redis(connection_pool=pool)
    try:
        await client.ping()
        recorded = await client.hgetall(store.keys.epoch)
        assert recorded[b"run"] == (await noted_run_id(client)).encode()
        await client.ping()  # same connection: nothing changes
        assert await client.hgetall(store.keys.epoch) == recorded
        await client.hset(store.keys.epoch, "run", "a-server-that-is-gone")
        await pool.disconnect()
        await client.ping()
        now = await client.hgetall(store.keys.epoch)
        assert now[b"id"] != recorded[b"id"] and now[b"run"] == recorded[b"run"]
    finally:
        await client.aclose()
        await pool.disconnect()


async def test_whose_a_job_is_is_kept_for_made_jobs_only(store: JobStore) -> None:
    """keys.job_tenant: written with each job (readers that know only its id), and gone
    again when the idempotency key made it a replay of an earlier job."""
    job = await new_job(store)
    assert await store.tenants_of([job["id"], "unknown"]) == ["t", None]
    assert 0 < await store.redis.ttl(store.keys.job_tenant(job["id"])) <= 600
    made = []
    for _ in range(2):
        fields = {**job, "id": secrets.token_hex(8), "created_at": time.time()}
        made.append((fields["id"], await store.create("t", fields, ("idem", "fp"))))
    (first, created), (second, replayed) = made
    assert created.job_id == first and replayed == (first, "fp", "")
    assert await store.tenants_of([first, second]) == ["t", None]


async def test_a_job_is_made_after_redis_forgot_the_scripts(store: JobStore) -> None:
    """Creation sends its script by hash with the job's listing, in one round trip; a
    Redis that restarted or was flushed knows no scripts: it is loaded and sent again."""
    await store.redis.script_flush()
    job = await new_job(store, "queued")
    snap = await store.snapshot(job["id"], "t")
    assert snap is not None and snap.status == "queued" and snap.seq == 1
    assert await store.tenants_of([job["id"]]) == ["t"]
    assert await store.redis.sismember(store.keys.tenants, "t")  # type: ignore[misc]
