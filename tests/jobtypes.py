"""Job types that exist only for tests; workers load them with PUSHSVC_JOB_MODULES."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from pushsvc.errors import FatalJobError
from pushsvc.jobs import JobContext, job_type


class SleepPayload(BaseModel):
    seconds: float = 5.0


@job_type("sleepy", payload=SleepPayload, timeout_s=0.5, max_attempts=1)
async def sleepy(ctx: JobContext, payload: SleepPayload) -> dict[str, float]:
    """Sleeps longer than its 0.5 s timeout allows."""
    await ctx.progress(1, "sleeping")
    await asyncio.sleep(payload.seconds)
    return {"slept": payload.seconds}


class Empty(BaseModel):
    pass


@job_type("first_run_fails", payload=Empty, max_attempts=1)
async def first_run_fails(ctx: JobContext, payload: Empty) -> dict[str, int]:
    """Fails (not retryable) in its first run; succeeds once re-run with POST /retry."""
    if ctx.run == 1:
        raise FatalJobError("the first run always fails", code="first_run")
    return {"run": ctx.run}


class SlowPayload(BaseModel):
    steps: int = 50
    interval_ms: int = 100


@job_type("fragile", payload=SlowPayload, max_attempts=1)
async def fragile(ctx: JobContext, payload: SlowPayload) -> dict[str, int]:
    """A slow job with a single attempt: a lost worker fails it."""
    for step in range(payload.steps):
        await asyncio.sleep(payload.interval_ms / 1000)
        await ctx.progress(100 * (step + 1) / payload.steps)
    return {"steps": payload.steps}


@job_type("bad_result", payload=Empty, max_attempts=1)
async def bad_result(ctx: JobContext, payload: Empty) -> object:
    """Returns something JSON cannot hold."""
    return {"when": object()}


@job_type("inner_timeout", payload=Empty, max_attempts=2)
async def inner_timeout(ctx: JobContext, payload: Empty) -> dict[str, int]:
    """An upstream call times out in the first attempt (not the job's own timeout)."""
    if ctx.attempt == 1:
        raise TimeoutError("upstream took too long")
    return {"attempt": ctx.attempt}


class ChattyPayload(BaseModel):
    chunks: int = 100
    size: int = 100
    interval_ms: int = 0  # between chunks (0: as fast as it can)


@job_type("chatty", payload=ChattyPayload, max_attempts=1)
async def chatty(ctx: JobContext, payload: ChattyPayload) -> dict[str, int]:
    """Streams numbered output chunks as fast as it can (the worker's throttle decides)."""
    for i in range(payload.chunks):
        await ctx.output(f"<{i}>".ljust(payload.size, "."))
        await ctx.progress(100 * (i + 1) / payload.chunks)
        if payload.interval_ms:
            await asyncio.sleep(payload.interval_ms / 1000)
    return {"chunks": payload.chunks}
