"""``pushsvc bench model-limits``: a fleet of workers under one shared per-model limit
(``PUSHSVC_MODEL_LIMITS``) against a model server that answers 429 above the same limit.

The limit is ``rate`` requests a second counted over a window of ``duration_s`` (the
headline: 1/s over 60 s, i.e. 60 rpm); ``jobs`` generate jobs are submitted at once, far
more than the limit lets through, so the fleet waits on it for the whole run. Figures: the
requests the server saw, the 429s it sent (every one seen by pushsvc: the target is 0),
the jobs' outcomes and the rate achieved against the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from rich.console import Console

from ..procs import wait_until
from .load import Options
from .stack import OFFLINE_MODEL, BenchError, private, workers_seen

MODEL = OFFLINE_MODEL
TERMINAL = frozenset({"completed", "failed", "cancelled"})
POLL_S = 1.0  # how often the bench reads its jobs' states


@dataclass
class LimitedStack:
    api: str  # the API's base URL
    model: str  # the model server's base URL


def limit_of(o: Options) -> tuple[int, float]:
    """(requests per window, window in seconds) from the options."""
    return max(1, round(o.rate * o.duration_s)), o.duration_s


@contextlib.contextmanager
def limited_stack(o: Options, log: Console) -> Iterator[LimitedStack]:
    """A private Redis, a model server limited to ``limit_of(o)``, one API and
    ``o.workers`` workers that share the same limit; all stopped afterwards."""
    limit, window = limit_of(o)
    with private("model-limits") as own:
        rpm = ["--tokens-per-s", "1000", "--rpm", str(limit), "--rpm-window-s", f"{window:g}"]
        model, _ = own.model(rpm)
        env = own.model_env(model, model_limits=f"{MODEL}=rpm:{limit},window_s:{window:g}")
        own.workers(o.workers, env)
        api, _ = own.api(env)
        wait_until(lambda: workers_seen(api, o.workers), 30, f"{o.workers} workers up")
        limited = f"model {model} ({limit}/{window:g} s)"
        log.print(f"bench: Redis :{own.redis.port}, API {api}, {limited}")
        yield LimitedStack(api, model)


async def _run_jobs(api: str, jobs: int, log: Console) -> dict[str, int]:
    """Submit ``jobs`` generate jobs at once; wait for all to end; count their states."""
    async with httpx.AsyncClient(base_url=api, timeout=30) as http:
        ids = []
        for i in range(jobs):
            body = {"type": "generate", "payload": {"prompt": f"[[tokens:5]] bench job {i}"}}
            resp = await http.post("/v1/jobs", json=body)
            if resp.status_code != 202:
                raise BenchError(f"submit answered {resp.status_code}: {resp.text[:200]}")
            ids.append(resp.json()["id"])
        states: dict[str, str] = {}
        while len(states) < jobs:
            await asyncio.sleep(POLL_S)  # polling another process's jobs: nothing to await
            for job_id in [j for j in ids if j not in states]:
                status = (await http.get(f"/v1/jobs/{job_id}")).json()["status"]
                if status in TERMINAL:
                    states[job_id] = status
            log.print(f"bench: {len(states)}/{jobs} jobs ended", end="\r")
    return {s: list(states.values()).count(s) for s in TERMINAL}


def figures(served: dict[str, Any], outcomes: dict[str, int], o: Options) -> dict[str, Any]:
    """The run's figures from the model server's counters and the jobs' outcomes."""
    limit, window = limit_of(o)
    admitted = served["requests"] - served["rate_limited"]
    span = served["last_at"] - served["first_at"]
    achieved = (admitted - 1) / span * window if admitted > 1 and span > 0 else None
    return {
        "limit_per_window": limit,
        "window_s": window,
        "requests_sent": served["requests"],
        "http_429_seen": served["rate_limited"],
        "jobs": outcomes,
        "busy_s": round(span, 2),
        "achieved_per_window": achieved,
        "achieved_vs_limit": None if achieved is None else achieved / limit,
    }


def model_limits(o: Options, log: Console) -> dict[str, Any]:
    """The scenario: its own stack, ``o.jobs`` jobs, the figures."""
    with limited_stack(o, log) as stack:
        began = time.monotonic()
        outcomes = asyncio.run(_run_jobs(stack.api, o.jobs, log))
        served = httpx.get(f"{stack.model}/_fake/stats", timeout=10).json()
        served.update(httpx.get(f"{stack.model}/_fake/limits", timeout=10).json())
        log.print(f"bench: {o.jobs} jobs in {time.monotonic() - began:.1f} s")
    return figures(served, outcomes, o)
