"""Job types that only the bench's workers load
(``PUSHSVC_JOB_MODULES=pushsvc.tools.bench.jobtypes``); the service never imports this module."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, Field

from ...jobs import JobContext, job_type

# Text with what a model's answer has (spaces, quotes, newlines): JSON must escape it.
LINE = 'The answer, "in short": it depends on the load.\n'


class BulkyPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    output_kib: int = Field(1024, ge=0, le=65536, description="output to write, in KiB")
    chunk_kib: int = Field(4, ge=1, le=1024, description="output per ctx.output() call")
    ticks: int = Field(0, ge=0, le=100000, description="progress reports after the output")
    tick_ms: int = Field(100, ge=1, le=60000, description="time between them")


@job_type("bulky", payload=BulkyPayload, timeout_s=3600, max_attempts=1)
async def bulky(ctx: JobContext, payload: BulkyPayload) -> dict[str, int]:
    """Writes ``output_kib`` of text, then reports progress ``ticks`` times (a job with a
    large output that is still running)."""
    size = payload.chunk_kib * 1024
    text = LINE * (size // len(LINE) + 1)
    for i in range(-(-payload.output_kib // payload.chunk_kib)):
        await ctx.output(f"<{i}>{text}"[:size])
    for step in range(1, payload.ticks + 1):
        await asyncio.sleep(payload.tick_ms / 1000)
        await ctx.progress(100 * step / payload.ticks, "ticking")
    return {"output_kib": payload.output_kib}
