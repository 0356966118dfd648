"""The built-in ``ticker`` job type: a timed loop that demos, tests and benchmarks use."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, Field

from .context import JobContext
from .errors import JobError
from .jobs import job_type


class TickerPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(10, ge=1, le=10000, description="how many steps to run")
    interval_ms: int = Field(100, ge=0, le=60000, description="sleep per step")
    fail_at_step: int | None = Field(None, ge=1, description="raise an error at this step")
    fail_retryable: bool = Field(False, description="whether that error is retryable")
    fail_attempts: int | None = Field(
        None, ge=1, description="fail only during the first N attempts (default: every attempt)"
    )


@job_type("ticker", payload=TickerPayload, timeout_s=3600, max_attempts=3)
async def ticker(ctx: JobContext, payload: TickerPayload) -> dict[str, int]:
    """Sleeps interval_ms per step and reports progress after each step."""
    for step in range(1, payload.steps + 1):
        await asyncio.sleep(payload.interval_ms / 1000)
        if payload.fail_at_step == step and _should_fail(ctx.attempt, payload.fail_attempts):
            raise JobError(
                f"ticker failed at step {step} as asked",
                code="ticker_failure",
                retryable=payload.fail_retryable,
            )
        await ctx.progress(100 * step / payload.steps, "ticking", f"step {step}/{payload.steps}")
    return {"steps": payload.steps}


def _should_fail(attempt: int, fail_attempts: int | None) -> bool:
    return fail_attempts is None or attempt <= fail_attempts
