"""The push-vs-poll scenario of ``pushsvc bench``: the same clients watch the same jobs to
the end, by SSE and by polling every ``POLL_S``, counting requests and staleness."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.console import Console

from .clients import (
    PER_CLIENT,
    TERMINAL,
    Clients,
    Watcher,
    http_client,
    read_stream,
    tickers,
    until,
)
from .load import Options, delta, pct, ratio
from .stack import BenchError, Target, cpu_seconds

POLL_S = 2.0  # the polling design pushsvc replaces


@dataclass
class _Watch:
    """What one client learnt when, per job: (receive time, job seq); and what it cost."""

    requests: int = 0
    seen: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: defaultdict(list))


async def _sse_client(http: httpx.AsyncClient, url: str, jobs: list[str]) -> _Watch:
    """One stream: the job's own, or one multiplexed stream naming every job watched."""
    w = _Watch(requests=1)
    path = (
        f"/v1/jobs/{jobs[0]}/events"
        if len(jobs) == 1
        else "/v1/events?" + "&".join(f"job={j}" for j in jobs)
    )
    await read_stream(
        http, url + path, lambda _, d: w.seen[d["job_id"]].append((time.time(), d["seq"]))
    )
    return w


async def _poll_client(http: httpx.AsyncClient, url: str, jobs: list[str]) -> _Watch:
    """Each job polled on its own timer, as a page of polling cards does."""
    w = _Watch()
    await asyncio.gather(*(_poll_job(http, url, j, w) for j in jobs))
    return w


async def _poll_job(http: httpx.AsyncClient, url: str, job_id: str, w: _Watch) -> None:
    """GET every POLL_S from a random phase, with If-None-Match, until the job ended."""
    headers = dict[str, str]()
    await asyncio.sleep(random.uniform(0, POLL_S))
    next_at = time.monotonic()
    while True:
        try:
            resp = await http.get(f"{url}/v1/jobs/{job_id}", headers=headers)
        except httpx.RemoteProtocolError:
            # uvicorn closed the idle keep-alive connection as it was reused (its 5 s
            # timeout vs. a 2 s poll from a pool): a real poller retries, so do we.
            w.requests += 1
            resp = await http.get(f"{url}/v1/jobs/{job_id}", headers=headers)
        w.requests += 1
        if resp.status_code == 200:
            job = resp.json()
            w.seen[job_id].append((time.time(), job["seq"]))
            headers = {"If-None-Match": resp.headers["etag"]}
            if job["status"] in TERMINAL:
                return
        next_at = max(next_at + POLL_S, time.monotonic())  # behind: no burst to catch up
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


def staleness(seen: list[tuple[float, int]], changes: dict[int, float]) -> list[float]:
    """For each change after the first look: first time a state at least as new was seen,
    minus the change's publish time (a change never seen is stale until a newer one is)."""
    if not seen:
        return []
    out = []
    for seq, ts in changes.items():
        if seq > seen[0][1]:
            at = next((t for t, s in seen if s >= seq), None)
            if at is not None:
                out.append(max(0.0, at - ts))
    return out


# One kind of client in a watch round (``_sse_client``, ``_poll_client``).
WatchFn = Callable[[httpx.AsyncClient, str, list[str]], Awaitable[_Watch]]


async def _watch_round(
    http: httpx.AsyncClient, target: Target, o: Options, client: WatchFn
) -> dict[str, Any]:
    watcher = Watcher()  # the oracle: each change's publish time
    async with watcher.running(http, target.urls[0]), Clients(PER_CLIENT) as clients:
        cpu0 = cpu_seconds(target.pids)
        ids = await tickers(http, target.urls, o.jobs, o.rate, round(o.duration_s * o.rate))
        k = min(o.per_client, len(ids))
        pairs = [
            (target.urls[i % len(target.urls)], [ids[(i * k + j) % len(ids)] for j in range(k)])
            for i in range(o.clients)
        ]
        watches = await asyncio.wait_for(
            asyncio.gather(*(client(clients[i], u, js) for i, (u, js) in enumerate(pairs))),
            o.duration_s + 60,
        )
        cpu = delta(cpu_seconds(target.pids), cpu0)
        with contextlib.suppress(BenchError):
            await until(lambda: set(ids) <= watcher.ended, 5, "terminal events")
    stale = [
        s
        for w, (_, js) in zip(watches, pairs, strict=True)
        for j in js
        for s in staleness(w.seen[j], watcher.changes[j])
    ]
    return {
        "requests": sum(w.requests for w in watches),
        "changes_seen": len(stale),
        "staleness_p50_s": pct(stale, 0.5),
        "staleness_p99_s": pct(stale, 0.99),
        "staleness_max_s": max(stale, default=None),
        "api_cpu_s": cpu,
    }


async def push_vs_poll(target: Target, o: Options, log: Console) -> dict[str, Any]:
    """The same clients watch the same jobs to the end, by SSE and by polling."""
    async with http_client() as http:
        log.print(f"bench: {o.clients} clients over SSE")
        sse = await _watch_round(http, target, o, _sse_client)
        log.print(f"bench: {o.clients} clients polling every {POLL_S:g} s")
        poll = await _watch_round(http, target, o, _poll_client)
    return {
        "sse": sse,
        "poll": poll,
        "requests_ratio": ratio(poll["requests"], sse["requests"]),
        "cpu_ratio": ratio(poll["api_cpu_s"], sse["api_cpu_s"]),
    }
