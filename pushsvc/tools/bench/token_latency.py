"""``pushsvc bench token-latency``: from the model server writing a token to an SSE
watcher receiving it, at ``jobs`` concurrent ``generate`` jobs with ``streams`` watchers
in all (the headline: 100 jobs, 10 watchers each), through the worker's publish throttle.

The watchers are the bench's light SSE readers (light_sse.py: raw HTTP/1.1 over real
sockets on ``/v1/jobs/{id}/events``, parsing only what is measured), not browsers; the
load generator's own loop lag is reported beside the latencies it inflates. tokens.py
has the stack and the measuring.
"""

from __future__ import annotations

import asyncio
from typing import Any

from rich.console import Console

from ...settings import Settings
from .load import Options
from .tokens import Load, model_stack, models_for, run_jobs, steady_figures

TARGET_P99_MS = 150.0  # issue 16


def token_latency(o: Options, log: Console) -> dict[str, Any]:
    """The scenario on its own stack: ``rate`` tokens/s per job for ``duration_s``."""
    load = Load(
        jobs=o.jobs,
        rate=o.rate,
        tokens=max(1, round(o.rate * o.duration_s)),
        per_job=max(1, o.streams // o.jobs),
    )
    # The stack's processes inherit this environment: the throttle they run with.
    hz = Settings.model_validate({}).publish_rate_hz
    with model_stack(log, models_for(load), concurrency=max(64, o.jobs)) as stack:
        run = asyncio.run(run_jobs(stack, load, log))
    path = run.path.figures()
    return {
        "publish_rate_hz": hz,
        "watchers": load.jobs * load.per_job,
        "jobs_ended": run.outcomes,
        **path,
        "target_p99_ms": TARGET_P99_MS,
        "target_met": path["p99_ms"] is not None and path["p99_ms"] <= TARGET_P99_MS,
        **run.lag.figures(),
        **steady_figures(run, load),
    }
