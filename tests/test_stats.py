"""Stats and alerts (pushsvc/stats.py): throughput, durations, the alerts firing and
clearing, and the stats pushed over SSE."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from .conftest import TICK, Client, make_client, ops_api, worker
from .procs import RedisServer


async def _stats(client: Client) -> dict[str, Any]:
    resp = await client.http.get("/v1/stats")
    assert resp.status_code == 200
    body: dict[str, Any] = resp.json()
    return body


def alert(stats: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((a for a in stats["alerts"] if a["name"] == name), None)


async def test_stats_report_throughput_success_and_durations(
    redis_server: RedisServer, redis: Redis
) -> None:
    async with ops_api(redis_server, redis) as (client, env):
        ids = [
            (await client.submit("ticker", {"steps": 2, "interval_ms": 50}))["id"] for _ in range(4)
        ]
        ids.append((await client.submit("ticker", {**TICK, "fail_at_step": 1}))["id"])
        with worker(env):
            for job_id in ids:
                await client.wait(job_id)
            stats = await _stats(client)
    overall = stats["overall"]
    assert overall["completed"] == 4 and overall["failed"] == 1
    assert overall["success_rate"] == 0.8 and overall["throughput_per_s"] > 0
    assert 0.09 <= overall["duration_p50_s"] <= overall["duration_p95_s"] < 5
    assert stats["types"]["ticker"]["completed"] == 4
    assert overall["queue_depth"] == 0 and overall["running"] == 0


async def test_queue_depth_and_workers_absent_alerts_fire_and_clear(
    redis_server: RedisServer, redis: Redis
) -> None:
    async with ops_api(redis_server, redis, alert_queue_depth="2", alert_workers_absent_s="2") as (
        client,
        env,
    ):
        ids = [(await client.submit("ticker", TICK))["id"] for _ in range(3)]
        stats = await _stats(client)
        assert alert(stats, "queue_depth")["value"] == 3  # type: ignore[index]
        assert alert(stats, "workers_absent") is not None
        assert stats["overall"]["oldest_queued_age_s"] >= 0
        with worker(env):
            for job_id in ids:
                await client.wait(job_id)
            stats = await _wait_stats(client, lambda s: alert(s, "queue_depth") is None)
            assert alert(stats, "workers_absent") is None


async def _wait_stats(client: Client, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Stats are cached for a second per process: ask again until they show it."""
    async with asyncio.timeout(15):
        while not check(stats := await _stats(client)):
            await asyncio.sleep(0.2)
    return stats


async def test_failure_rate_alert_fires_and_clears(redis_server: RedisServer, redis: Redis) -> None:
    async with ops_api(redis_server, redis) as (client, env):
        with worker(env):
            bad = [
                (await client.submit("ticker", {**TICK, "fail_at_step": 1}))["id"] for _ in range(5)
            ]
            for job_id in bad:
                await client.wait(job_id)
            fired = await _wait_stats(client, lambda s: alert(s, "failure_rate") is not None)
            assert alert(fired, "failure_rate")["value"] == 1.0  # type: ignore[index]
            good = [(await client.submit("ticker", TICK))["id"] for _ in range(50)]
            for job_id in good:
                await client.wait(job_id)
            await _wait_stats(client, lambda s: alert(s, "failure_rate") is None)


async def test_stuck_job_alert_names_only_the_callers_jobs(
    redis_server: RedisServer, redis: Redis
) -> None:
    async with ops_api(redis_server, redis, alert_stuck_s="0.5") as (client, env):
        other = make_client(str(client.http.base_url), "key-b", redis, env["PUSHSVC_NAMESPACE"])
        try:
            with worker(env):
                job = await client.submit("fragile", {"steps": 1, "interval_ms": 3000})
                await client.wait(job["id"], lambda j: j["status"] == "running")
                fired = await _wait_stats(client, lambda s: alert(s, "stuck_jobs") is not None)
                assert alert(fired, "stuck_jobs")["job_ids"] == [job["id"]]  # type: ignore[index]
                # Another tenant's stats are its own: no stuck job of its, no alert.
                assert alert(await _stats(other), "stuck_jobs") is None
                await client.wait(job["id"])
                await _wait_stats(client, lambda s: alert(s, "stuck_jobs") is None)
        finally:
            await other.http.aclose()


async def test_stats_are_pushed_over_sse(redis_server: RedisServer, redis: Redis) -> None:
    from .sse import events

    async with ops_api(redis_server, redis, stats_push_s="0.2") as (client, env):
        got = []
        async for event in events(client.http, "/v1/stats/events"):
            got.append(event)
            if len(got) == 2:
                break
        assert [e.kind for e in got] == ["stats", "stats"] and got[1].id == 2
        assert "overall" in got[0].data and "alerts" in got[0].data


async def test_model_calls_show_per_type_and_model_to_their_own_tenant(
    redis_server: RedisServer, redis: Redis, model_url: str
) -> None:
    llm = {"llm_base_url": model_url, "llm_model": "fake-1", "llm_prices": "fake-1=1000/2000"}
    async with ops_api(redis_server, redis, admin_keys="op-key", **llm) as (a, env):
        b = make_client(str(a.http.base_url), "key-b", redis, env["PUSHSVC_NAMESPACE"])
        operator = make_client(str(a.http.base_url), "op-key", redis, env["PUSHSVC_NAMESPACE"])
        with worker(env):
            mine = [await a.submit("generate", {"prompt": f"a{i} [[tokens:10]]"}) for i in (1, 2)]
            theirs = await b.submit("generate", {"prompt": "b [[tokens:7]]", "model": "other-1"})
            for owner, job in [(a, mine[0]), (a, mine[1]), (b, theirs)]:
                await owner.wait(job["id"], timeout=30)
            seen_a, seen_b, seen_all = await _stats(a), await _stats(b), await _stats(operator)
        await b.http.aclose()
        await operator.http.aclose()
    fake = seen_a["types"]["generate"]["llm"]
    assert set(fake) == {"fake-1"}  # the other tenant's model is none of its business
    figures = fake["fake-1"]
    assert figures["calls"] == 2 and figures["completion_tokens"] == 20
    assert figures["ttft_p50_s"] > 0 and figures["tokens_per_s_p50"] > 0
    assert figures["estimated_calls"] == 0 and figures["cost_usd"] > 0
    other = seen_b["types"]["generate"]["llm"]
    assert set(other) == {"other-1"} and other["other-1"]["cost_usd"] is None  # no price
    assert set(seen_all["types"]["generate"]["llm"]) == {"fake-1", "other-1"}
    assert seen_all["types"]["generate"]["llm"]["other-1"]["completion_tokens"] == 7
    # Finished attempts too: each tenant's rows are in its own stream (its slot); an
    # operator's figures merge them all, a tenant's are its own.
    done = [seen["overall"]["completed"] for seen in (seen_a, seen_b, seen_all)]
    assert done == [2, 1, 3]
