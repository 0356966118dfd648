"""``pushsvc bench queue-cost``: what places in line (``line.py``) cost with ``jobs`` queued
jobs watched by ``streams`` multiplexed streams of ``per_client`` jobs each.

Three phases of ``duration_s`` each, on a stack of its own: *still* (watched, no worker:
the asks alone, nothing moves), *moving* (watched, one worker starting ``rate`` attempts
a second, so every place moves every second) and *unwatched* (the streams closed, the
same worker: the baseline). Per phase: the API's and Redis's CPU (seconds a second),
Redis's time in scripts (``INFO commandstats``; in *still* that is the place scripts
alone), and the ``queue`` events a second the streams received. The cost of places while
the line moves is *moving* less *unwatched*.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse
from redis import Redis
from rich.console import Console

from ..procs import RedisServer, spawn, wait_until
from .load import Options
from .stack import BenchError, cpu_seconds, private, stack_env, workers_seen

# One slot-second per job: a worker of concurrency ``rate`` starts about ``rate`` a second.
JOB = {"type": "ticker", "payload": {"steps": 1, "interval_ms": 1000}}
SUBMITTERS = 32


@dataclass
class LineStack:
    api: str
    api_pid: int
    redis: RedisServer
    env: dict[str, str]
    workdir: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)


@contextlib.contextmanager
def line_stack(log: Console) -> Iterator[LineStack]:
    """A private Redis and one API, no worker yet; all stopped afterwards."""
    with private("queue-cost") as own:
        env = stack_env(own.redis.url)
        url, api = own.api(env)
        log.print(f"bench: Redis :{own.redis.port}, API {url}, no worker yet")
        yield LineStack(url, api.pid, own.redis, env, own.workdir, own.procs)


@dataclass
class Received:
    queue_events: int = 0
    placed: set[str] = field(default_factory=set)  # jobs that got a first place


async def _submit(http: httpx.AsyncClient, jobs: int) -> list[str]:
    ids: list[str] = []

    async def submitter(n: int) -> None:
        for _ in range(n):
            resp = await http.post("/v1/jobs", json=JOB)
            if resp.status_code != 202:
                raise BenchError(f"submit answered {resp.status_code}: {resp.text[:200]}")
            ids.append(resp.json()["id"])

    share = [jobs // SUBMITTERS + (i < jobs % SUBMITTERS) for i in range(SUBMITTERS)]
    await asyncio.gather(*(submitter(n) for n in share))
    return ids


async def _watch(http: httpx.AsyncClient, job_ids: list[str], got: Received) -> None:
    query = "&".join(f"job={j}" for j in job_ids)
    async with aconnect_sse(http, "GET", f"/v1/events?{query}") as source:
        source.response.raise_for_status()
        async for sse in source.aiter_sse():
            if sse.event == "queue":
                got.queue_events += 1
                got.placed.add(sse.json()["job_id"])


class Meter:
    """CPU of the API and of Redis, Redis's script time, and events received."""

    def __init__(self, stack: LineStack, got: Received) -> None:
        self.stack, self.got = stack, got
        self.redis = Redis.from_url(stack.redis.url)

    def read(self) -> tuple[float, float, float, float, int]:
        cpu: dict[str, Any] = self.redis.info("cpu")  # type: ignore[assignment]
        stats: dict[str, Any] = self.redis.info("commandstats")  # type: ignore[assignment]
        scripts = stats.get("cmdstat_evalsha", {}).get("usec", 0)
        api = cpu_seconds([self.stack.api_pid]) or 0.0
        redis = float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])
        return time.monotonic(), api, redis, scripts / 1e6, self.got.queue_events

    async def phase(self, seconds: float) -> dict[str, float]:
        before = self.read()
        await asyncio.sleep(seconds)  # the measured window itself: nothing to await
        after = self.read()
        span = after[0] - before[0]
        names = ("api_cpu_s_per_s", "redis_cpu_s_per_s", "redis_scripts_s_per_s")
        pairs = zip(names, after[1:4], before[1:4], strict=True)
        out = {n: round((a - b) / span, 4) for n, a, b in pairs}
        out["queue_events_per_s"] = round((after[4] - before[4]) / span, 1)
        return out


async def _measure(stack: LineStack, o: Options, log: Console) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=o.streams + SUBMITTERS + 8)
    async with httpx.AsyncClient(base_url=stack.api, timeout=60, limits=limits) as http:
        ids = await _submit(http, o.jobs)
        log.print(f"bench: {len(ids)} jobs queued")
        got = Received()
        groups = [ids[i : i + o.per_client] for i in range(0, len(ids), o.per_client)]
        watched = groups[: o.streams]
        tasks = [asyncio.create_task(_watch(http, g, got)) for g in watched]
        try:
            want = sum(len(g) for g in watched)
            async with asyncio.timeout(120):
                while len(got.placed) < want:  # every watched job's first place
                    await asyncio.sleep(0.2)
            log.print(f"bench: {len(watched)} streams watch {want} jobs; measuring")
            meter = Meter(stack, got)
            result = {"watched_jobs": want, "still": await meter.phase(o.duration_s)}
            await asyncio.to_thread(_start_worker, stack, o)
            result["moving"] = await meter.phase(o.duration_s)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        result["unwatched"] = await meter.phase(o.duration_s)
        return result


def _start_worker(stack: LineStack, o: Options) -> None:
    env = {**stack.env, "PUSHSVC_WORKER_CONCURRENCY": str(max(1, round(o.rate)))}
    stack.procs.append(spawn(["worker"], env, Path(stack.workdir, "worker.log")))
    wait_until(lambda: workers_seen(stack.api, 1), 30, "the worker up")


def queue_cost(o: Options, log: Console) -> dict[str, Any]:
    """The scenario: its own stack, the three phases, the figures."""
    if o.per_client > 100:
        raise BenchError("per_client: a multiplexed stream names at most 100 jobs")
    with line_stack(log) as stack:
        result = asyncio.run(_measure(stack, o, log))
    moving, base = result["moving"], result["unwatched"]
    result["places_cost_while_moving"] = {
        k: round(moving[k] - base[k], 4) for k in ("api_cpu_s_per_s", "redis_cpu_s_per_s")
    }
    return result
