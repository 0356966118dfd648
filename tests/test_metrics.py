"""Prometheus metrics (pushsvc/metrics.py): the API's and a worker's counters move as jobs run."""

from __future__ import annotations

import httpx
from redis.asyncio import Redis

from .conftest import TICK, ops_api, worker
from .procs import RedisServer, free_port, http_ok, wait_until


async def _metric(http: httpx.AsyncClient, url: str, name: str) -> float:
    text = (await http.get(url)).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


async def test_metrics_move_as_jobs_run(redis_server: RedisServer, redis: Redis) -> None:
    port = free_port()
    async with ops_api(redis_server, redis) as (client, env):
        with worker(env, worker_metrics_port=str(port)):
            wurl = f"http://127.0.0.1:{port}/metrics"
            wait_until(lambda: http_ok(wurl), 20, "worker metrics")
            api = str(client.http.base_url) + "/metrics"
            before = await _metric(client.http, api, 'pushsvc_jobs_submitted_total{type="ticker"}')
            ids = [(await client.submit("ticker", TICK))["id"] for _ in range(3)]
            failing = await client.submit("ticker", {**TICK, "fail_at_step": 1})
            for job_id in [*ids, failing["id"]]:
                await client.wait(job_id)
            after = await _metric(client.http, api, 'pushsvc_jobs_submitted_total{type="ticker"}')
            completed = 'pushsvc_jobs_total{outcome="completed",type="ticker"}'
            failed = 'pushsvc_jobs_total{outcome="failed",type="ticker"}'
            assert after - before == 4
            assert await _metric(client.http, wurl, completed) == 3
            assert await _metric(client.http, wurl, failed) == 1
            assert await _metric(client.http, wurl, "pushsvc_job_duration_seconds_count") == 3
            # running, progress, completed each; running, failed for the failing one
            assert await _metric(client.http, wurl, "pushsvc_events_published_total") == 11
            assert await _metric(client.http, api, "pushsvc_queue_depth") == 0
