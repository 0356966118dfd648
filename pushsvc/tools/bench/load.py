"""The load scenarios of ``pushsvc bench``: fanout, throughput, scaleout (push-vs-poll:
``push_poll.py``), the :class:`Options` they all take, and their figures' arithmetic.

Each takes a :class:`stack.Target` (its API URLs and, where known, their pids, for CPU
and RSS from psutil) and :class:`Options`, and returns its figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import httpx
from httpx_sse import SSEError
from rich.console import Console

from .clients import (
    PER_CLIENT,
    TERMINAL,
    Clients,
    Watcher,
    cancel_all,
    http_client,
    read_stream,
    submit_many,
    tickers,
    until,
)
from .stack import (
    BenchError,
    Target,
    cpu_seconds,
    redis_sockets,
    rss_bytes,
    scrape,
)

OPEN_BATCH = 100  # streams opened at once: a burst of thousands only measures the backlog


@dataclass(frozen=True)
class Options:
    """streams/clients: connections; jobs: tickers (fanout, push-vs-poll) or short jobs;
    workers: worker processes; duration_s: measured window or job length; rate: events/s
    per job; clients in throughput: concurrent submitters; per_client: jobs each
    push-vs-poll client watches (over one multiplexed stream, or polling each); minutes:
    how long the chaos run injects faults."""

    streams: int = 0
    jobs: int = 0
    workers: int = 0
    clients: int = 0
    duration_s: float = 0.0
    rate: float = 0.0
    per_client: int = 1
    minutes: float = 0.0


def pct(values: list[float], q: float) -> float | None:
    """The ``q`` quantile of ``values`` (nearest rank), None for none."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else None


def delta(after: float | None, before: float | None) -> float | None:
    """``after - before``, None if either is unknown."""
    return None if after is None or before is None else after - before


def ratio(num: float | None, den: float | None, scale: float = 1.0) -> float | None:
    """``num * scale / den``, None if unknown or ``den`` is 0."""
    return None if num is None or not den else num * scale / den


# -- fanout -------------------------------------------------------------------------


@dataclass
class _Fan:
    opened: int = 0
    failed: int = 0
    dropped: int = 0
    error: str = ""
    measuring: bool = False
    latencies: list[float] = field(default_factory=list)

    def settled(self, n: int) -> bool:
        return self.opened + self.failed >= n


async def _fan_stream(http: httpx.AsyncClient, url: str, state: _Fan) -> None:
    seen = False

    def on_event(kind: str, data: dict[str, Any]) -> None:
        nonlocal seen
        if not seen:  # the snapshot: subscribed, and counted open
            seen = True
            state.opened += 1
        elif state.measuring and kind != "snapshot":
            state.latencies.append(time.time() - data["ts"])

    try:
        await read_stream(http, url, on_event)
    except (httpx.HTTPError, SSEError, ValueError) as exc:
        state.error = repr(exc)
    if seen:
        state.dropped += 1  # no stream should end before we cancel it
    else:
        state.failed += 1


def _fan_urls(target: Target, ids: list[str], n: int) -> list[str]:
    """Streams spread over APIs and jobs; every other one per API is multiplexed."""
    out = []
    for i in range(n):
        base, job_id = target.urls[i % len(target.urls)], ids[i % len(ids)]
        mux = (i // len(target.urls)) % 2 == 1
        out.append(f"{base}/v1/events?job={job_id}" if mux else f"{base}/v1/jobs/{job_id}/events")
    return out


async def _open(
    clients: Clients,
    urls: list[str],
    state: _Fan,
    tasks: list[asyncio.Task[None]],
    first_client: int = 0,
) -> float:
    """Open ``urls`` a batch at a time, as users ``first_client`` on of ``clients``."""
    started = time.monotonic()
    for at in range(0, len(urls), OPEN_BATCH):
        tasks += [
            asyncio.create_task(_fan_stream(clients[first_client + i], urls[i], state))
            for i in range(at, min(at + OPEN_BATCH, len(urls)))
        ]
        await until(partial(state.settled, len(tasks)), 30, f"{len(tasks)} streams opening")
    if state.failed:
        raise BenchError(f"{state.failed} of {len(urls)} streams did not open: {state.error}")
    return time.monotonic() - started


async def _fan_window(
    http: httpx.AsyncClient, target: Target, o: Options, state: _Fan
) -> dict[str, Any]:
    before = await scrape(http, target.urls)
    cpu0, own0 = cpu_seconds(target.pids), _own_cpu()
    state.measuring, started = True, time.monotonic()
    await asyncio.sleep(o.duration_s)
    state.measuring, elapsed = False, time.monotonic() - started
    cpu, own = delta(cpu_seconds(target.pids), cpu0), _own_cpu() - own0
    after = await scrape(http, target.urls)
    ms = [1000 * x for x in state.latencies]
    served = "pushsvc_events_delivered_total"
    return {
        "open_streams": sum(m.get("pushsvc_open_streams", 0) for m in after),
        "events_delivered": len(ms),
        "events_per_s": len(ms) / elapsed,
        "server_events_delivered": sum(  # what the API routed to stream queues
            a.get(served, 0) - b.get(served, 0) for a, b in zip(after, before, strict=True)
        ),
        "latency_p50_ms": pct(ms, 0.5),
        "latency_p99_ms": pct(ms, 0.99),
        "latency_max_ms": max(ms, default=None),
        "api_cpu_s": cpu,
        "cpu_us_per_event": ratio(cpu, len(ms), 1e6),
        "client_cpu_s": own,
        "redis_connections": max(m.get("pushsvc_redis_connections", 0) for m in after),
        "redis_sockets": redis_sockets(target),
    }


async def fanout(target: Target, o: Options, log: Console) -> dict[str, Any]:
    """``o.streams`` streams over ``o.jobs`` tickers: delivery, latency, memory, CPU."""
    warmup = _warmup(o)
    steps = _ticker_steps(o, warmup)
    state, tasks = _Fan(), list[asyncio.Task[None]]()
    async with http_client() as http, Clients(PER_CLIENT) as clients:
        ids = await tickers(http, target.urls, o.jobs, o.rate, steps)
        try:
            rss0 = rss_bytes(target.pids)
            open_s = await _open(clients, _fan_urls(target, ids, o.streams), state, tasks)
            log.print(f"bench: {o.streams} streams open in {open_s:.1f} s; measuring")
            await asyncio.sleep(warmup)
            rss = rss_bytes(target.pids)
            figures = await _fan_window(http, target, o, state)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await cancel_all(http, target.urls[0], ids)
    return {
        "mux_streams": sum("/v1/events?" in u for u in _fan_urls(target, ids, o.streams)),
        "open_s": open_s,
        **figures,
        "streams_dropped": state.dropped,
        "rss_before_bytes": rss0,
        "rss_streams_bytes": rss,
        "rss_per_stream_bytes": ratio(delta(rss, rss0), o.streams),
    }


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def _warmup(o: Options) -> float:
    return min(2.0, max(0.5, o.duration_s / 4))


def _ticker_steps(o: Options, warmup: float) -> int:
    """Ticker steps enough for the streams to open (30 s a batch at worst) and the window."""
    return math.ceil(o.rate * (30 * (1 + o.streams / OPEN_BATCH) + warmup + o.duration_s))


# -- fanout beside a baseline server -----------------------------------------------


@dataclass
class _Side:
    """One server's share of a side-by-side fanout: its streams and what they cost it."""

    target: Target
    urls: list[str]
    state: _Fan = field(default_factory=_Fan)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    open_s: float = 0.0
    rss0: int | None = None
    rss: int | None = None
    cpu0: float | None = None
    cpu: float | None = None

    def figures(self, elapsed: float) -> dict[str, Any]:
        ms = [1000 * x for x in self.state.latencies]
        return {
            "streams": len(self.urls),
            "open_s": self.open_s,
            "events_delivered": len(ms),
            "events_per_s": len(ms) / elapsed,
            "latency_p50_ms": pct(ms, 0.5),
            "latency_p99_ms": pct(ms, 0.99),
            "cpu_s": self.cpu,
            "cpu_us_per_event": ratio(self.cpu, len(ms), 1e6),
            "streams_dropped": self.state.dropped,
            "rss_before_bytes": self.rss0,
            "rss_streams_bytes": self.rss,
            "rss_per_stream_bytes": ratio(delta(self.rss, self.rss0), len(self.urls)),
        }


async def _measure_sides(sides: list[_Side], duration_s: float) -> float:
    """Every side's CPU over one window of ``duration_s``, its events counted; the window's
    length."""
    for side in sides:
        side.cpu0, side.state.measuring = cpu_seconds(side.target.pids), True
    started = time.monotonic()
    await asyncio.sleep(duration_s)
    elapsed = time.monotonic() - started
    for side in sides:
        side.state.measuring = False
        side.cpu = delta(cpu_seconds(side.target.pids), side.cpu0)
    return elapsed


async def fanout_beside(
    target: Target, baseline: Target, name: str, o: Options, log: Console
) -> dict[str, Any]:
    """``o.streams`` streams over ``o.jobs`` tickers, half to pushsvc's API (one job's
    stream each), half to the baseline server ``name``, on the same jobs, measured in
    the same window: each server's own CPU and RSS per event, and their ratio."""
    warmup, half = _warmup(o), o.streams // 2
    async with http_client() as http, Clients(PER_CLIENT) as clients:
        ids = await tickers(http, target.urls, o.jobs, o.rate, _ticker_steps(o, warmup))
        base, peer = target.urls[0], baseline.urls[0]
        sides = [
            _Side(target, [f"{base}/v1/jobs/{ids[i % len(ids)]}/events" for i in range(half)]),
            _Side(baseline, [f"{peer}/jobs/{ids[i % len(ids)]}/events" for i in range(half)]),
        ]
        try:
            for side in sides:
                side.rss0 = rss_bytes(side.target.pids)
            for at, side in zip((0, half), sides, strict=True):
                side.open_s = await _open(clients, side.urls, side.state, side.tasks, at)
            log.print(f"bench: {half} streams open on each server; measuring")
            await asyncio.sleep(warmup)
            for side in sides:
                side.rss = rss_bytes(side.target.pids)
            own0 = _own_cpu()
            elapsed = await _measure_sides(sides, o.duration_s)
            own = _own_cpu() - own0
        finally:
            tasks = [t for side in sides for t in side.tasks]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await cancel_all(http, base, ids)
    ours, theirs = sides[0].figures(elapsed), sides[1].figures(elapsed)
    return {
        "baseline": name,
        "pushsvc": ours,
        name: theirs,
        "cpu_ratio": ratio(ours["cpu_us_per_event"], theirs["cpu_us_per_event"]),
        "rss_ratio": ratio(ours["rss_per_stream_bytes"], theirs["rss_per_stream_bytes"]),
        "client_cpu_s": own,  # the load generator's: near the window's length, it is the limit
    }


# -- throughput and scale-out -------------------------------------------------------


async def _listed(http: httpx.AsyncClient, url: str, wanted: set[str]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 200}
    while len(found) < len(wanted):  # newest first: ours come first
        resp = await http.get(f"{url}/v1/jobs", params=params)
        resp.raise_for_status()
        body = resp.json()
        found += [j for j in body["jobs"] if j["id"] in wanted]
        if not body.get("next_cursor"):
            break
        params["cursor"] = body["next_cursor"]
    return found


async def _ended(
    http: httpx.AsyncClient, url: str, wanted: set[str], timeout: float
) -> list[dict[str, Any]]:
    """The jobs' final snapshots, polling the list until every job ended."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = await _listed(http, url, wanted)
        ended = sum(j["status"] in TERMINAL for j in jobs)
        if ended == len(wanted):
            return jobs
        if time.monotonic() > deadline:
            raise BenchError(f"{ended} of {len(wanted)} jobs ended in time")
        await asyncio.sleep(0.5)


async def throughput(target: Target, o: Options, log: Console) -> dict[str, Any]:
    """``o.jobs`` one-step tickers from ``o.clients`` submitters: jobs/s and queue wait."""
    watcher = Watcher()
    async with http_client() as http:
        async with watcher.running(http, target.urls[0]) as task:
            cpu0, started = cpu_seconds(target.pids), time.time()
            ids = await submit_many(target.urls, o.jobs, o.clients, {"steps": 1, "interval_ms": 0})
            submit_s, wanted = time.time() - started, set(ids)
            log.print(f"bench: {o.jobs} jobs submitted in {submit_s:.1f} s")
            with contextlib.suppress(BenchError):  # the stream failed: poll below
                await until(
                    lambda: wanted <= watcher.ended or task.done(),
                    60 + o.jobs / 10,
                    "every job ending",
                )
            cpu = delta(cpu_seconds(target.pids), cpu0)
        jobs = await _ended(http, target.urls[0], wanted, 60)
    elapsed = max(j["finished_at"] for j in jobs) - started
    waits = [j["started_at"] - j["created_at"] for j in jobs if j.get("started_at")]
    return {
        "completed": sum(j["status"] == "completed" for j in jobs),
        "elapsed_s": elapsed,
        "jobs_per_s": len(jobs) / elapsed,
        "submits_per_s": len(jobs) / submit_s,
        "queue_wait_p50_s": pct(waits, 0.5),
        "queue_wait_p99_s": pct(waits, 0.99),
        "api_cpu_s": cpu,
        "api_cpu_us_per_job": ratio(cpu, len(jobs), 1e6),
    }


async def scaleout(target: Target, o: Options, log: Console, single: bool) -> dict[str, Any]:
    """Throughput and fanout across every API; with ``single``, throughput via one too."""
    out: dict[str, Any] = {"apis": len(target.urls)}
    if single and len(target.urls) > 1:
        log.print("bench: throughput through one API")
        out["throughput_single"] = await throughput(target.first(), o, log)
    log.print(f"bench: throughput through {len(target.urls)} APIs")
    out["throughput"] = await throughput(target, o, log)
    out["fanout"] = await fanout(target, replace(o, jobs=max(1, o.streams // 50)), log)
    one = out.get("throughput_single", {}).get("jobs_per_s")
    out["throughput_ratio"] = ratio(out["throughput"]["jobs_per_s"], one)
    return out


# -- by name ----------------------------------------------------------------------
