"""The golden fixture: ``events.json`` holds event sequences and the job a client must
hold after them (both clients run every case: tests/test_job_view.py, the Python client's
``apply_event``; tests/browser/test_golden.py, pushsvc.js's ``applyEvent``).

Also defines ``golden``, a job type that writes text and fails as asked; workers load it
via PUSHSVC_JOB_MODULES (``tests.golden``).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from pushsvc.errors import JobError
from pushsvc.job_view import apply_event
from pushsvc.jobs import JobContext, job_type

GOLDEN = Path(__file__).parent / "events.json"
CASES: list[dict[str, Any]] = json.loads(GOLDEN.read_text())["cases"]
# The words of waits, places in line and telemetry: both clients say these (words.json).
WORDS: dict[str, Any] = json.loads((Path(__file__).parent / "words.json").read_text())


def fold(events: list[list[Any]]) -> dict[str, Any]:
    job: dict[str, Any] = {}
    for kind, data in events:
        job = apply_event(job, kind, data)
    return job


class GoldenPayload(BaseModel):
    words: int = Field(3, ge=1, le=1000)
    interval_ms: int = Field(0, ge=0, le=1000)
    fail_attempts: int = Field(0, ge=0, description="attempts that fail (retryable)")
    fail_first: bool = Field(False, description="fail those attempts before writing text")
    fatal: bool = Field(False, description="fail for good at the end, keeping the text")


@job_type("golden", payload=GoldenPayload, max_attempts=3)
async def golden(ctx: JobContext, payload: GoldenPayload) -> dict[str, str]:
    """Writes numbered words with progress; fails as asked (before or after the text)."""
    failing = ctx.attempt <= payload.fail_attempts
    if failing and payload.fail_first:
        raise JobError("asked to fail first", code="golden_retry", retryable=True)
    text = ""
    for i in range(payload.words):
        await asyncio.sleep(payload.interval_ms / 1000)
        word = f"a{ctx.attempt}w{i} "
        text += word
        await ctx.output(word)
        await ctx.progress(100 * (i + 1) / payload.words, "writing", f"word {i + 1}")
    if failing:
        raise JobError("asked to fail after writing", code="golden_retry", retryable=True)
    if payload.fatal:
        raise JobError("asked to fail for good", code="golden_fatal", result={"text": text})
    return {"text": text}
