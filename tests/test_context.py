"""A job's context (pushsvc/context.py): the worker-side throttle of progress and output,
against a real Redis."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from pushsvc.context import JobContext
from pushsvc.epoch import StreamPosition
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


async def script_calls(store: JobStore) -> int:
    stats = await store.redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_a_flush_sends_progress_and_the_text_since_as_one_call(store: JobStore) -> None:
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


class ReplyCutter:
    """A TCP proxy to a Redis: once ``armed``, the next reply does not come back, and the
    connection is cut instead (the command ran; its caller sees a connection error)."""

    def __init__(self, target: int) -> None:
        self.target, self.armed, self.cut, self.port = target, False, 0, 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ReplyCutter:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, replies: bool) -> None:
            while data := await src.read(65536):
                if replies and self.armed:
                    self.armed, self.cut = False, self.cut + 1
                    writer.transport.abort()
                    up_writer.transport.abort()
                    return
                dst.write(data)
                await dst.drain()

        await asyncio.gather(
            pump(reader, up_writer, False), pump(up_reader, writer, True), return_exceptions=True
        )


async def test_a_flush_whose_reply_was_lost_is_sent_again_and_made_once(
    store: JobStore,
) -> None:
    """The script ran, its reply was lost (the connection cut): the flush is sent again
    as it was, with its token, and the script answers it as made, so the text is
    written once. Was: the text sent again with the next, written twice (a chaos run on
    a cluster, a reply lost as a shard failed over)."""
    job = await new_job(store)
    async with ReplyCutter(store.redis.connection_pool.connection_kwargs["port"]) as proxy:
        cut = JobStore(Redis(port=proxy.port), store.settings)
        ctx = JobContext(cut, job, rate_hz=0.001)  # the first write flushes, later ones wait
        await ctx.output("ab")
        proxy.armed = True
        await ctx.output("cd")
        await ctx.flush(final=False)  # made, its reply lost: kept
        assert proxy.cut == 1
        await ctx.output("ef")
        await ctx.flush()  # the lost one again (answered as made), then the new text
        await ctx.close()
        await cut.redis.aclose()
    snap = await store.snapshot(job["id"], "t")
    assert snap is not None and snap.output == "abcdef"
    assert not ctx.superseded
