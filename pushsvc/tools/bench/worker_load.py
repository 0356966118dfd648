"""``pushsvc bench workers``: how many streaming ``generate`` jobs one worker process
(one core: asyncio) carries, ``rate`` tokens/s each, in steps up to ``jobs`` (headline:
25, 50, 100, 200, 300, 500 at 30 tokens/s). Per step: the worker's CPU per token chunk and its
cores, the model server's (it must not be the bottleneck), the token path's p50/p99 over
one all-jobs stream, and whether the worker kept pace. tokens.py has the measuring.
"""

from __future__ import annotations

import asyncio
from typing import Any

from rich.console import Console

from .load import Options
from .token_latency import TARGET_P99_MS
from .tokens import Load, model_stack, models_for, run_jobs, steady_figures

STEPS = (25, 50, 100, 200, 300, 500)
# The worker keeps pace when it publishes tokens within this of the model writing them
# (p99; the throttle alone adds up to 1/PUSHSVC_PUBLISH_RATE_HZ). Tokens/s alone would not
# show it: a worker behind lets the model's writes pile up in socket buffers.
KEEP_UP_MS = 1000.0
CORE_BUSY = 0.9  # a worker past this share of one core is saturated


def _step(figures: dict[str, Any]) -> dict[str, bool]:
    behind = figures.get("to_publish_p99_ms")
    busy = (figures.get("worker_cores") or 0) >= CORE_BUSY
    # Not "steady": the jobs never all streamed at once, so the step shows no such load.
    steady = figures.get("window") == "steady"
    paced = behind is not None and behind <= KEEP_UP_MS and not busy and steady
    p99 = figures.get("p99_ms")
    return {"keeps_pace": paced, "p99_met": paced and p99 is not None and p99 <= TARGET_P99_MS}


def workers(o: Options, log: Console) -> dict[str, Any]:
    """The scenario: one worker (PUSHSVC_WORKER_CONCURRENCY = ``jobs``), step by step."""
    steps = sorted({s for s in STEPS if s < o.jobs} | {o.jobs})
    tokens = max(1, round(o.rate * o.duration_s))
    biggest = Load(o.jobs, o.rate, tokens, per_job=0)
    rows: dict[str, Any] = {}
    with model_stack(log, models_for(biggest), concurrency=o.jobs) as stack:
        for jobs in steps:
            load = Load(jobs, o.rate, tokens, per_job=0)
            run = asyncio.run(run_jobs(stack, load, log))
            figures = {**run.path.figures(), **steady_figures(run, load), **run.lag.figures()}
            figures |= _step(figures)
            rows[str(jobs)] = {"jobs_ended": run.outcomes, **figures}
            cores = figures.get("worker_cores")
            log.print(f"bench: {jobs} jobs: p99 {figures['p99_ms']} ms, worker cores {cores}")
    return {
        "steps": rows,
        "most_jobs_keeping_pace": max(
            (int(k) for k, r in rows.items() if r["keeps_pace"]), default=None
        ),
        "most_jobs_p99_met": max((int(k) for k, r in rows.items() if r["p99_met"]), default=None),
    }
