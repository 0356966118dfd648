"""A job's context (pushsvc/context.py): the worker-side throttle of progress and output,
against a real Redis."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError

from pushsvc import transitions
from pushsvc.context import JobContext
from pushsvc.epoch import StreamPosition
from pushsvc.publish import Published
from pushsvc.store import JobStore

from .conftest import open_store
from .procs import RedisServer
from .test_store import new_job


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[JobStore]:
    async with open_store(redis_server, job_ttl_s=600) as opened:
        yield opened


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
    found = await store.events_after(job["tenant"], job["id"], StreamPosition(1))
    assert found is not None
    assert len(found[0]) <= 2 * flushes_allowed  # each flush: one progress, one output
    snap = await store.snapshot(job["id"], "t")
    assert snap is not None and snap.output == "".join(text)
    assert snap.progress == pytest.approx(4999 / 50)


@pytest.fixture
async def own_store() -> AsyncIterator[JobStore]:
    """A store on a Redis of its own: script calls are counted server-wide, and on the
    shared one another test's processes may call scripts meanwhile (a worker's mover
    does, each poll; a CI run counted two more than the test made)."""
    server = RedisServer().start()
    try:
        async with open_store(server, job_ttl_s=600) as opened:
            yield opened
    finally:
        server.stop()


async def script_calls(store: JobStore) -> int:
    stats = await store.redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_a_flush_sends_progress_and_the_text_since_as_one_call(
    own_store: JobStore,
) -> None:
    store = own_store
    job = await new_job(store)
    ctx = JobContext(store, job, rate_hz=0.001)  # the first write flushes, later ones wait
    await ctx.progress(10)
    first = ctx.writer.known
    calls, events = await script_calls(store), store.published
    async with store.redis.pubsub() as sub:
        await sub.subscribe(store.keys.job_channel(job["tenant"], job["id"]))
        await sub.get_message(timeout=5)  # the subscribe confirmation
        await ctx.output("a")
        await ctx.progress(20, stage="answering")
        await ctx.output("b")
        await ctx.flush()
        heard = [await sub.get_message(timeout=5) for _ in range(2)]
    await ctx.close()
    assert await script_calls(store) == calls + 1  # one round trip, one script run
    assert store.published == events + 2  # two events
    assert first is not None
    found = await store.events_after(job["tenant"], job["id"], first)
    assert found is not None
    events = [(f.seq, f.kind, json.loads(f.data)) for f in found[0]]
    assert [(seq, kind) for seq, kind, _ in events] == [
        (first.seq + 1, "progress"),
        (first.seq + 2, "output"),
    ]
    assert events[0][2]["stage"] == "answering" and events[1][2]["delta"] == "ab"
    assert [m["data"].split(b" ")[2] for m in heard if m] == [b"progress", b"output"]
    assert ctx.writer.known == StreamPosition(first.seq + 2, first.epoch)
    snap = await store.snapshot(job["id"], "t")
    assert snap is not None and snap.output == "ab" and snap.progress == 20


async def test_a_flush_to_a_store_that_lost_the_job_rewrites_it_with_its_text_once(
    store: JobStore,
) -> None:
    job = await new_job(store)
    ctx = JobContext(store, job, rate_hz=0.001)
    await ctx.output("ab")
    await store.redis.delete(
        store.keys.job(job["tenant"], job["id"]), store.keys.job_output(job["tenant"], job["id"])
    )
    await ctx.output("cd")
    await ctx.progress(50)
    await ctx.flush()
    await ctx.close()
    snap = await store.snapshot(job["id"], "t")
    assert snap is not None and snap.output == "abcd" and snap.progress == 50
    assert not ctx.superseded


async def test_progress_never_decreases_within_an_attempt(store: JobStore) -> None:
    job = await new_job(store)
    ctx = JobContext(store, job, rate_hz=1000)
    for pct in [10, 50, 20, 120, -5]:
        await ctx.progress(pct)
    await ctx.flush()
    snap = await store.snapshot(job["id"], "t")
    assert snap is not None and snap.progress == 100


class LosesAReply(Connection):
    """A connection that, once ``armed``, reads the next reply and drops it, cut as if the
    network failed: the command ran on the real Redis, its caller sees a connection
    error."""

    armed = False
    cut = 0

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        reply = await super().read_response(*args, **kwargs)
        if LosesAReply.armed:
            LosesAReply.armed, LosesAReply.cut = False, LosesAReply.cut + 1
            await self.disconnect()
            raise RedisConnectionError("the reply was lost (test)")
        return reply


async def test_a_flush_whose_reply_was_lost_is_sent_again_and_made_once(
    store: JobStore,
) -> None:
    """The script ran, its reply was lost (the connection cut): the flush is sent again
    as it was, with its token, and the script answers it as made, so the text is
    written once. Was: the text sent again with the next, written twice (a chaos run on
    a cluster, a reply lost as a shard failed over)."""
    job = await new_job(store)
    port = store.redis.connection_pool.connection_kwargs["port"]
    pool = ConnectionPool(port=port, connection_class=LosesAReply)
    cut = JobStore(Redis(connection_pool=pool), store.settings)
    try:
        ctx = JobContext(cut, job, rate_hz=0.001)  # the first write flushes, later ones wait
        await ctx.output("ab")
        LosesAReply.armed = True
        await ctx.output("cd")
        await ctx.flush(final=False)  # made, its reply lost: kept
        assert LosesAReply.cut == 1
        await ctx.output("ef")
        await ctx.flush()  # the lost one again (answered as made), then the new text
        await ctx.close()
        # The end, its reply lost too: sent again, it is answered as made (not refused
        # as a change of a job no longer running, which would stop the attempt).
        LosesAReply.armed = True
        with pytest.raises(RedisConnectionError):
            await ctx.apply(transitions.complete({"n": 1}), "end-1")
        again = await ctx.apply(transitions.complete({"n": 1}), "end-1")
        assert isinstance(again, Published) and again.status == "completed"
    finally:
        await pool.aclose()  # a pool given to a client is not closed with it
    snap = await store.snapshot(job["id"], "t")
    assert snap is not None and snap.output == "abcdef" and snap.result == {"n": 1}
    assert not ctx.superseded
