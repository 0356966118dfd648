"""A job's context (pushsvc/context.py): the worker-side throttle of progress and output,
against a real Redis."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

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
    found = await store.events_after(job["id"], StreamPosition(1))
    assert found is not None
    assert len(found[0]) <= 2 * flushes_allowed  # each flush: one progress, one output
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
