"""``/v1/stats``: throughput, success rate, durations and alerts over a sliding window.

Computed from the stats stream the publish script appends to (one row per finished or
retried attempt), the queues, the leases and the worker heartbeats; pushed to the
dashboard as SSE. One computation per API process serves every caller for a second.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .api import services
from .errors import Unavailable
from .keys import Keys
from .queue import PRIORITY_OFFSET_MS
from .settings import Settings

CACHE_S = 1.0


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


class Stats:
    """Reads Redis and builds the stats document (cached briefly per process)."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis, self.settings, self.keys = redis, settings, Keys(settings.namespace)
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> dict[str, Any]:
        async with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > CACHE_S:
                self._cached = (time.monotonic(), await self._compute())
            return self._cached[1]

    async def _compute(self) -> dict[str, Any]:
        now = time.time()
        window = self.settings.stats_window_s
        rows = [f for _, f in await self.redis.xrange(self.keys.stats, int((now - window) * 1000))]
        by_type: dict[str, list[dict[bytes, bytes]]] = {}
        for row in rows:
            by_type.setdefault(row[b"t"].decode(), []).append(row)
        queue = await self._queue(now)
        running = await self._running(now)
        overall = summarize(rows, window)
        doc = {
            "window_s": window,
            "at": now,
            "overall": {**overall, **queue, "running": len(running)},
            "types": {t: summarize(r, window) for t, r in sorted(by_type.items())},
            "workers": await self._workers(now),
        }
        doc["alerts"] = self._alerts(doc, running, now)
        return doc

    async def _queue(self, now: float) -> dict[str, Any]:
        # arq keeps a running attempt in its queue until it ends: those are not waiting.
        running = set(await self.redis.zrange(self.keys.leases, 0, -1))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.queue)
            pipe.zcard(self.keys.delayed)
            for offset in PRIORITY_OFFSET_MS.values():  # the oldest of each priority class
                low, high = now * 1000 - offset - 10**11, now * 1000 - offset + 10**11
                pipe.zrangebyscore(
                    self.keys.queue, low, high, start=0, num=len(running) + 1, withscores=True
                )
            in_queue, delayed, *oldest = await pipe.execute()
        ready = max(0, in_queue - len(running))
        ages = []
        for rows, offset in zip(oldest, PRIORITY_OFFSET_MS.values(), strict=True):
            first = next((score for member, score in rows if member not in running), None)
            if first is not None:
                ages.append(now - (first + offset) / 1000)
        return {
            "queue_depth": ready + delayed,
            "queued_ready": ready,
            "oldest_queued_age_s": round(max(ages), 3) if ages else None,
        }

    async def _running(self, now: float) -> list[tuple[str, float]]:
        """(job id, seconds since its last event) for every running attempt."""
        members = await self.redis.zrange(self.keys.leases, 0, -1)
        job_ids = [m.decode().rsplit(".", 1)[0] for m in members]
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(self.keys.job(job_id), ["updated_at", "tenant"])
            found = await pipe.execute()
        return [(j, now - int(u) / 1000) for j, (u, _) in zip(job_ids, found, strict=True) if u]

    async def _workers(self, now: float) -> int:
        since = (now - self.settings.alert_workers_absent_s) * 1000
        return int(await self.redis.zcount(self.keys.workers, since, "+inf"))

    def _alerts(
        self, doc: dict[str, Any], running: list[tuple[str, float]], now: float
    ) -> list[dict[str, Any]]:
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
        stuck = [job_id for job_id, silent in running if silent > s.alert_stuck_s]
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


def for_tenant(doc: dict[str, Any], tenant_jobs: set[str]) -> dict[str, Any]:
    """Stats are global; job ids in alerts are shown only for the caller's own jobs."""
    alerts = [
        {**a, "job_ids": [j for j in a["job_ids"] if j in tenant_jobs]} if "job_ids" in a else a
        for a in doc["alerts"]
    ]
    return {**doc, "alerts": alerts}


async def _own(request: Request, doc: dict[str, Any], tenant: str) -> dict[str, Any]:
    svc = services(request)
    ids = {j for a in doc["alerts"] for j in a.get("job_ids", [])}
    mine = set()
    for job_id in ids:
        fields = await svc.store.load(job_id)
        if fields is not None and fields["tenant"] == tenant:
            mine.add(job_id)
    return for_tenant(doc, mine)


async def stats(request: Request) -> Response:
    svc = services(request)
    tenant = svc.auth.tenant(request)
    doc = await request.app.state.stats.get()
    return JSONResponse(await _own(request, doc, tenant), headers={"Cache-Control": "no-cache"})


async def stats_events(request: Request) -> Response:
    """The same document, pushed every ``PUSHSVC_STATS_PUSH_S`` (the dashboard's feed)."""
    svc = services(request)
    tenant = svc.auth.stream_tenant(request, {"tenant"})
    if not svc.settings.streams_enabled:
        raise Unavailable(
            "streaming is turned off here; poll GET /v1/stats", code="streams_disabled"
        )

    async def frames() -> AsyncIterator[bytes]:
        yield f"retry: {svc.settings.retry_ms}\n\n".encode()
        seq = 0
        while True:
            doc = await _own(request, await request.app.state.stats.get(), tenant)
            seq += 1
            data = json.dumps(doc, separators=(",", ":"))
            yield f"id: {seq}\nevent: stats\ndata: {data}\n\n".encode()
            await asyncio.sleep(svc.settings.stats_push_s)

    return EventSourceResponse(frames(), ping=svc.settings.heartbeat_s)


routes = [
    Route("/v1/stats", stats, methods=["GET"]),
    Route("/v1/stats/events", stats_events, methods=["GET"]),
]
