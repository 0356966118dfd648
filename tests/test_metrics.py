"""Prometheus metrics (pushsvc/metrics.py): the API's and a worker's counters move as jobs run."""

from __future__ import annotations

import httpx
import pytest
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


async def test_worker_metrics_time_model_calls_per_model(
    redis_server: RedisServer, redis: Redis, model_url: str
) -> None:
    port = free_port()
    llm = {"llm_base_url": model_url, "llm_model": "fake-1", "llm_prices": "fake-1=1000/2000"}
    async with ops_api(redis_server, redis, **llm) as (client, env):
        with worker(env, worker_metrics_port=str(port)):
            wurl = f"http://127.0.0.1:{port}/metrics"
            wait_until(lambda: http_ok(wurl), 20, "worker metrics")
            ids = [
                (await client.submit("generate", {"prompt": f"m{i} [[tokens:10]]", **model}))["id"]
                for i, model in enumerate([{}, {}, {"model": "free-2"}])
            ]
            done = [await client.wait(job_id) for job_id in ids]
            assert [j["status"] for j in done] == ["completed"] * 3

            async def metric(name: str) -> float:
                return await _metric(client.http, wurl, name)

            # free-2 is no model the operator named (default, price, limit): "other".
            fake, free = '{model="fake-1"}', '{model="other"}'
            assert await metric(f"pushsvc_llm_ttft_seconds_count{fake}") == 2
            assert await metric(f"pushsvc_llm_ttft_seconds_count{free}") == 1
            assert await metric(f"pushsvc_llm_tokens_per_second_count{fake}") == 2
            completion = 'pushsvc_llm_tokens_total{kind="completion",model="fake-1"}'
            assert await metric(completion) == 20
            cost = sum(j["result"]["llm"]["cost_usd"] for j in done[:2])
            assert await metric(f"pushsvc_llm_cost_usd_total{fake}") == pytest.approx(cost)
            assert await metric(f"pushsvc_llm_cost_usd_total{free}") == 0  # no price: no cost
