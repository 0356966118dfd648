"""``/v1/stats``: throughput, success rate, durations and alerts over a sliding window.

Computed from the stats stream the publish script appends to (one row per finished or
retried attempt), the model calls' log (``telemetry.CallLog``, one row per finished
call: each type's ``llm`` figures by model), the queues, the leases and the worker
heartbeats; pushed to the dashboard as SSE. One computation per API process serves
every caller for a second.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .api import services
from .auth import LOCAL_TENANT
from .errors import RateLimited, Unavailable
from .keys import Keys
from .models import Stats
from .operations import SSE, TEXT, Reply, operation
from .queue import CLASS_BASE, record_key
from .responses import JSONResponse
from .settings import Settings
from .sse import TOKEN, _counted
from .telemetry import summarize_calls

CACHE_S = 1.0
# arq's scores are turns (queue.py, fair share), not times: an attempt's wait is read
# from its arq record's enqueue time. Each class's oldest is among its first attempts
# (every tenant's oldest takes its class's next turns), so this many are read a class.
HEAD_SAMPLE = 64


def queued_age(record: bytes | None, now: float) -> float | None:
    """Seconds an attempt has waited, from its arq record (``et``: enqueued at, ms)."""
    try:
        return max(0.0, now - float(json.loads(record or b"")["et"]) / 1000)
    except (ValueError, KeyError, TypeError):
        return None  # started or ended meanwhile (arq dropped it), or not arq's


def percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, math.ceil(pct / 100 * len(ordered)) - 1)], 3)


def _num(raw: bytes | None) -> float | None:
    try:
        return float(raw) if raw else None
    except ValueError:
        return None  # "null": never started


def summarize(rows: list[dict[bytes, bytes]], window_s: float) -> dict[str, Any]:
    """Counts, throughput, success rate and duration/wait percentiles of ``rows``."""
    counts = {"completed": 0, "failed": 0, "cancelled": 0, "retried": 0}
    durations: list[float] = []
    waits: list[float] = []
    for row in rows:
        kind = row[b"s"].decode()
        counts[kind] = counts.get(kind, 0) + 1
        created, started, finished = _num(row.get(b"c")), _num(row.get(b"r")), _num(row[b"f"])
        if kind == "completed" and started is not None and finished is not None:
            durations.append(finished - started)
        if kind != "retried" and created is not None and started is not None:
            waits.append(started - created)
    decided = counts["completed"] + counts["failed"]
    finished_n = decided + counts["cancelled"]
    return {
        **counts,
        "throughput_per_s": round(finished_n / window_s, 3),
        "success_rate": round(counts["completed"] / decided, 4) if decided else None,
        "failure_rate": round(counts["failed"] / decided, 4) if decided else None,
        "duration_p50_s": percentile(durations, 50),
        "duration_p95_s": percentile(durations, 95),
        "queue_wait_p50_s": percentile(waits, 50),
        "queue_wait_p95_s": percentile(waits, 95),
    }


def _entry_order(entry_id: bytes) -> tuple[int, int]:
    """A stream entry id ``<ms>-<n>`` as numbers, to merge streams in time order."""
    ms, _, n = entry_id.partition(b"-")
    return int(ms), int(n or 0)


def _by_type(rows: list[dict[bytes, bytes]]) -> dict[str, list[dict[bytes, bytes]]]:
    grouped: dict[str, list[dict[bytes, bytes]]] = {}
    for row in rows:
        grouped.setdefault(row[b"t"].decode(), []).append(row)
    return grouped


@dataclass(frozen=True)
class Running:
    job_id: str
    silent_s: float  # since its last event
    tenant: str


NO_QUEUE: dict[str, Any] = {"queue_depth": 0, "queued_ready": 0, "oldest_queued_age_s": None}


@dataclass
class Reading:
    """One read of Redis; every view of it (operators', each tenant's) for CACHE_S."""

    at: float
    rows: list[dict[bytes, bytes]]
    queue: dict[str, Any]  # every tenant's waiting attempts
    running: list[Running]
    workers: int
    tenant_queues: dict[str, dict[str, Any]] | None = None  # read at a tenant's first view
    calls: list[dict[bytes, bytes]] = field(default_factory=list)  # finished model calls
    views: dict[str | None, dict[str, Any]] = field(default_factory=dict)


class StatsReader:
    """Reads Redis and builds the stats documents (cached briefly per process).

    An operator's document counts every tenant's jobs; a tenant's counts its own only
    (finished attempts by the stats rows' tenant, waiting and running ones by their
    job's): the load, failures and job ids of other tenants are none of its business.
    The worker count and its alert are the service's, shown to everyone.
    """

    def __init__(self, redis: Redis, settings: Settings, data: Any = None) -> None:
        """``redis``: the queue plane's client; ``data``: the data plane's (the same Redis
        when not given)."""
        self.redis, self.settings, self.keys = redis, settings, Keys(settings.namespace)
        self.data = redis if data is None else data
        self._reading: tuple[float, Reading] | None = None
        self._lock = asyncio.Lock()

    async def get(self, tenant: str | None = None) -> dict[str, Any]:
        """The document of ``tenant``'s jobs, or of every tenant's (None: operators)."""
        async with self._lock:
            if self._reading is None or time.monotonic() - self._reading[0] > CACHE_S:
                self._reading = (time.monotonic(), await self._read())
            reading = self._reading[1]
            if tenant not in reading.views:
                reading.views[tenant] = await self._view(reading, tenant)
            return reading.views[tenant]

    async def _read(self) -> Reading:
        now = time.time()
        since = int((now - self.settings.stats_window_s) * 1000)
        rows = await self._rows(since)
        calls = [f for _, f in await self.redis.xrange(self.keys.llm_calls, since)]
        queue = await self._queue(now)
        running, workers = await self._running(now), await self._workers(now)
        return Reading(now, rows, queue, running, workers, calls=calls)

    async def _rows(self, since_ms: int) -> list[dict[bytes, bytes]]:
        """Every tenant's stats rows since ``since_ms``, oldest first (each tenant's stream
        lives in its own slot: one read each, pipelined; a cluster client splits them)."""
        tenants = sorted(await self.data.smembers(self.keys.tenants))  # type: ignore[misc]
        if not tenants:
            return []
        async with self.data.pipeline(transaction=False) as pipe:
            for tenant in tenants:
                pipe.xrange(self.keys.tenant_stats(tenant.decode()), since_ms)
            streams = await pipe.execute()
        entries = [entry for rows in streams for entry in rows]
        entries.sort(key=lambda entry: _entry_order(entry[0]))
        return [fields for _, fields in entries]

    async def _view(self, reading: Reading, tenant: str | None) -> dict[str, Any]:
        if tenant is None:
            return self._document(
                reading, reading.rows, reading.queue, reading.running, reading.calls
            )
        if reading.tenant_queues is None:
            reading.tenant_queues = await self._tenant_queues(reading.at)
        name = tenant.encode()
        rows = [row for row in reading.rows if row.get(b"n") == name]
        running = [r for r in reading.running if r.tenant == tenant]
        queue = reading.tenant_queues.get(tenant, NO_QUEUE)
        calls = [row for row in reading.calls if row.get(b"n") == name]
        return self._document(reading, rows, queue, running, calls)

    def _document(
        self,
        reading: Reading,
        rows: list[dict[bytes, bytes]],
        queue: dict[str, Any],
        running: list[Running],
        calls: list[dict[bytes, bytes]],
    ) -> dict[str, Any]:
        window = self.settings.stats_window_s
        by_type, calls_by_type = _by_type(rows), _by_type(calls)
        doc = {
            "window_s": window,
            "at": reading.at,
            "overall": {**summarize(rows, window), **queue, "running": len(running)},
            # Each type's ``llm``: its model calls by model (a long job's calls show
            # before its attempt ends, so a type may have calls and no finished rows).
            "types": {
                t: {
                    **summarize(by_type.get(t, []), window),
                    "llm": summarize_calls(calls_by_type.get(t, [])),
                }
                for t in sorted(by_type.keys() | calls_by_type.keys())
            },
            "workers": reading.workers,
        }
        doc["alerts"] = self._alerts(doc, running)
        return doc

    async def _queue(self, now: float) -> dict[str, Any]:
        # arq keeps a running attempt in its queue until it ends: those are not waiting.
        running = set(await self.redis.zrange(self.keys.leases, 0, -1))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.queue)
            pipe.zcard(self.keys.delayed)
            for base in CLASS_BASE.values():  # the first attempts of each priority class
                num = len(running) + HEAD_SAMPLE
                pipe.zrangebyscore(self.keys.queue, -base, f"({10**15 - base}", start=0, num=num)
            in_queue, delayed, *heads = await pipe.execute()
        ready = max(0, in_queue - len(running))
        waiting = [m.decode() for rows in heads for m in rows if m not in running]
        records = await self.redis.mget([record_key(m) for m in waiting]) if waiting else []
        ages = [a for a in (queued_age(r, now) for r in records) if a is not None]
        return {
            "queue_depth": ready + delayed,
            "queued_ready": ready,
            "oldest_queued_age_s": round(max(ages), 3) if ages else None,
        }

    async def _running(self, now: float) -> list[Running]:
        """Every running attempt: its job, how long since its last event, its tenant."""
        members = await self.redis.zrange(self.keys.leases, 0, -1)
        job_ids = [m.decode().rsplit(".", 1)[0] for m in members]
        found = await self._read_jobs(job_ids, ["updated_at", "tenant"])
        return [
            Running(j, now - int(u) / 1000, t.decode())
            for j, (u, t) in zip(job_ids, found, strict=True)
            if u and t
        ]

    async def _tenant_queues(self, now: float) -> dict[str, dict[str, Any]]:
        """Each tenant's waiting attempts: every one's job read for its tenant. Read only
        when a tenant asks (the operators' figures need counts alone)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrange(self.keys.leases, 0, -1)
            pipe.zrange(self.keys.queue, 0, -1)
            pipe.zrange(self.keys.delayed, 0, -1)
            leases, queued, delayed = await pipe.execute()
        running = set(leases)
        # An attempt in its backoff is waiting but not ready ("<class>|<arq id>|<owner>").
        waiting = [m.decode() for m in queued if m not in running]
        backoff = [m.decode().split("|")[1] for m in delayed]
        arq_ids = waiting + backoff
        job_ids = [arq_id.rsplit(".", 1)[0] for arq_id in arq_ids]
        tenants = [t for (t,) in await self._read_jobs(job_ids, ["tenant"])]
        records = await self.redis.mget([record_key(m) for m in waiting]) if waiting else []
        figures: dict[str, dict[str, Any]] = {}
        ages = [queued_age(r, now) for r in records] + [None] * len(backoff)
        for i, (raw, age) in enumerate(zip(tenants, ages, strict=True)):
            if raw is None:
                continue  # ended (or expired) since the queue was read
            mine = figures.setdefault(raw.decode(), dict(NO_QUEUE))
            mine["queue_depth"] += 1
            if i < len(waiting):
                mine["queued_ready"] += 1
            if age is not None:
                oldest = mine["oldest_queued_age_s"]
                mine["oldest_queued_age_s"] = round(max(age, oldest or age), 3)
        return figures

    async def _read_jobs(self, job_ids: list[str], names: list[str]) -> list[list[Any]]:
        """Fields of jobs known by id alone (None each: unknown, or gone): whose each is
        (keys.job_tenant), then the fields from its tenant's keys."""
        if not job_ids:
            return []
        owners = await self.redis.mget([self.keys.job_tenant(j) for j in job_ids])
        async with self.data.pipeline(transaction=False) as pipe:
            for job_id, owner in zip(job_ids, owners, strict=True):
                pipe.hmget(self.keys.job(owner.decode() if owner else "", job_id), names)
            return list(await pipe.execute())

    async def _workers(self, now: float) -> int:
        since = (now - self.settings.alert_workers_absent_s) * 1000
        return int(await self.redis.zcount(self.keys.workers, since, "+inf"))

    def _alerts(self, doc: dict[str, Any], running: list[Running]) -> list[dict[str, Any]]:
        s, overall = self.settings, doc["overall"]
        alerts: list[dict[str, Any]] = []
        if overall["queue_depth"] > s.alert_queue_depth:
            alerts.append(
                {
                    "name": "queue_depth",
                    "value": overall["queue_depth"],
                    "threshold": s.alert_queue_depth,
                }
            )
        decided = overall["completed"] + overall["failed"]
        rate = overall["failure_rate"]
        if decided >= s.alert_min_jobs and rate is not None and rate > s.alert_failure_rate:
            alerts.append(
                {"name": "failure_rate", "value": rate, "threshold": s.alert_failure_rate}
            )
        stuck = [r.job_id for r in running if r.silent_s > s.alert_stuck_s]
        if stuck:
            alerts.append(
                {
                    "name": "stuck_jobs",
                    "value": len(stuck),
                    "job_ids": stuck,
                    "threshold": s.alert_stuck_s,
                }
            )
        if doc["workers"] == 0:
            alerts.append(
                {"name": "workers_absent", "value": 0, "threshold": s.alert_workers_absent_s}
            )
        return alerts


@operation(
    "getStats",
    "ops",
    "Queue depth, running, throughput, success rate, durations, alerts",
    Reply(200, "the stats", Stats),
)
async def stats(request: Request) -> Response:
    svc = services(request)
    doc = await request.app.state.stats.get(svc.auth.viewer(request))
    return JSONResponse(doc, headers={"Cache-Control": "no-cache"})


@operation(
    "statsEvents",
    "ops",
    "The stats, pushed periodically (SSE)",
    Reply(200, "the stream: a `stats` event every PUSHSVC_STATS_PUSH_S", media=SSE, schema=TEXT),
    params=(TOKEN,),
    auth="stream",
)
async def stats_events(request: Request) -> Response:
    """The same document, pushed every ``PUSHSVC_STATS_PUSH_S`` (the dashboard's feed). An
    open stream of a tenant (or of the local user) counts towards its stream limit."""
    svc = services(request)
    viewer = svc.auth.stream_viewer(request)
    if not svc.settings.streams_enabled:
        raise Unavailable(
            "streaming is turned off here; poll GET /v1/stats", code="streams_disabled"
        )
    counted = viewer if svc.auth.enabled else LOCAL_TENANT  # operators with a key: not
    limit = svc.settings.tenant_max_streams
    if counted is not None and limit and svc.open_streams.get(counted, 0) >= limit:
        raise RateLimited(f"at most {limit} open streams per tenant", retry_after_s=5)

    async def frames() -> AsyncGenerator[bytes, None]:
        yield f"retry: {svc.settings.retry_ms}\n\n".encode()
        seq = 0
        while True:
            doc = await request.app.state.stats.get(viewer)
            seq += 1
            data = json.dumps(doc, separators=(",", ":"))
            yield f"id: {seq}\nevent: stats\ndata: {data}\n\n".encode()
            await asyncio.sleep(svc.settings.stats_push_s)

    body = frames() if counted is None else _counted(svc.open_streams, counted, frames())
    return EventSourceResponse(body, ping=svc.settings.heartbeat_s)


routes = [
    Route("/v1/stats", stats, methods=["GET"]),
    Route("/v1/stats/events", stats_events, methods=["GET"]),
]
