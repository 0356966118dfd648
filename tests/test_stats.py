"""Operations: priorities, tenant limits, metrics, stats and alerts, CORS."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from pushsvc.worker import worker_session

from .conftest import Client, make_client, settings_for, stack_env
from .procs import Api, Proc, RedisServer, free_port, http_ok, wait_until

TICK = {"steps": 1, "interval_ms": 0}


@asynccontextmanager
async def ops_api(
    server: RedisServer, redis: Redis, key: str = "key-a", **settings: str
) -> AsyncIterator[tuple[Client, dict[str, str]]]:
    """An API of its own namespace and settings; the test decides about workers."""
    env = stack_env(server.url, f"o{secrets.token_hex(3)}", **settings)
    api = Api([], env).start()
    client = make_client(api.url, key, redis, env["PUSHSVC_NAMESPACE"])
    try:
        yield client, env
    finally:
        await client.http.aclose()
        api.stop()


@contextmanager
def worker(env: dict[str, str], **settings: str) -> Iterator[Proc]:
    proc = Proc(["worker"], {**env, **{f"PUSHSVC_{k.upper()}": v for k, v in settings.items()}})
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


async def burst(env: dict[str, str], **update: Any) -> None:
    """Run one in-process arq worker until the queue is empty."""
    settings = settings_for(env).model_copy(update={"poll_delay_s": 0.01, **update})
    async with worker_session(settings, burst=True, handle_signals=False) as w:
        await w.async_run()


async def test_high_priority_jobs_start_before_normal_and_low(
    redis_server: RedisServer, redis: Redis
) -> None:
    async with ops_api(redis_server, redis) as (client, env):
        order = ["low", "normal", "high", "low", "normal", "high"]
        ids = []
        for priority in order:
            resp = await client.http.post(
                "/v1/jobs", json={"type": "ticker", "payload": TICK, "priority": priority}
            )
            assert resp.status_code == 202 and resp.json()["priority"] == priority
            ids.append(resp.json()["id"])
        await burst(env, worker_concurrency=1)
        jobs = [await client.get(i) for i in ids]
        started = sorted(jobs, key=lambda j: j["started_at"])
        assert [j["priority"] for j in started] == [
            "high",
            "high",
            "normal",
            "normal",
            "low",
            "low",
        ]
        assert [j["id"] for j in started if j["priority"] == "high"] == [ids[2], ids[5]]


async def test_retry_backoff_is_kept_whatever_the_priority(
    redis_server: RedisServer, redis: Redis
) -> None:
    """Regression guard: priority offsets must not let a retry skip its backoff."""
    async with ops_api(redis_server, redis, retry_base_s="1") as (client, env):
        payload = {
            "steps": 1,
            "interval_ms": 0,
            "fail_at_step": 1,
            "fail_retryable": True,
            "fail_attempts": 1,
        }
        resp = await client.http.post(
            "/v1/jobs", json={"type": "ticker", "payload": payload, "priority": "high"}
        )
        with worker(env, retry_base_s="4"):
            done = await client.wait(resp.json()["id"], timeout=30)
        retry = [d for k, d in await client.log(done["id"]) if k == "status"][1]
        log = await client.log(done["id"])
        # The second attempt starts with a whole snapshot (its text starts anew).
        starts = [d["ts"] for k, d in log if k != "progress" and d.get("status") == "running"]
        assert done["status"] == "completed" and done["attempt"] == 2
        assert starts[-1] - retry["ts"] >= retry["retry_in_s"] - 0.05


async def test_tenant_running_limit_queues_the_rest_without_starving_others(
    redis_server: RedisServer, redis: Redis
) -> None:
    async with ops_api(redis_server, redis, tenant_max_running="1", throttle_delay_s="0.2") as (
        a,
        env,
    ):
        b = make_client(a.http.base_url.__str__(), "key-b", redis, env["PUSHSVC_NAMESPACE"])
        try:
            slow = {"steps": 5, "interval_ms": 100}
            mine = [(await a.submit("ticker", slow))["id"] for _ in range(3)]
            theirs = (await b.submit("ticker", slow))["id"]
            with worker(env, worker_concurrency="4"):
                done_a = [await a.wait(j, timeout=30) for j in mine]
                done_b = await b.wait(theirs, timeout=30)
        finally:
            await b.http.aclose()
    spans = sorted((j["started_at"], j["finished_at"]) for j in done_a)
    assert all(
        s2 >= f1 for (_, f1), (s2, _) in zip(spans, spans[1:], strict=False)
    )  # one at a time
    assert done_b["started_at"] < spans[-1][0]  # tenant b did not wait behind all of a's


async def test_submissions_per_minute_limit_answers_429(
    redis_server: RedisServer, redis: Redis
) -> None:
    async with ops_api(redis_server, redis, tenant_submits_per_minute="3") as (client, env):
        codes = []
        for _ in range(5):
            resp = await client.http.post("/v1/jobs", json={"type": "ticker", "payload": TICK})
            codes.append(resp.status_code)
        assert codes == [202, 202, 202, 429, 429]
        assert resp.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(resp.headers["retry-after"]) <= 60
        other = make_client(str(client.http.base_url), "key-b", redis, env["PUSHSVC_NAMESPACE"])
        try:  # a limit per tenant, not for everyone
            assert (
                await other.http.post("/v1/jobs", json={"type": "ticker", "payload": TICK})
            ).status_code == 202
        finally:
            await other.http.aclose()


async def test_open_streams_limit_per_tenant(redis_server: RedisServer, redis: Redis) -> None:
    async with ops_api(redis_server, redis, tenant_max_streams="2") as (client, env):
        job = await client.submit("ticker", {"steps": 100, "interval_ms": 100})
        path = f"/v1/jobs/{job['id']}/events"
        async with client.http.stream("GET", path) as first, client.http.stream("GET", path) as s2:
            assert first.status_code == s2.status_code == 200
            # Both are open once a frame came through. (Keep the iterators: leaving an
            # httpx line iterator early closes its response.)
            lines = [first.aiter_lines(), s2.aiter_lines()]
            assert [await it.__anext__() for it in lines] == ["retry: 2000"] * 2
            third = await client.http.get(path)
            assert third.status_code == 429 and third.json()["error"]["code"] == "rate_limited"
        async with client.http.stream("GET", path) as again:  # freed when they closed
            assert again.status_code == 200


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


@pytest.mark.parametrize("origins", ["", "https://app.example"])
async def test_cors_is_off_unless_origins_are_configured(
    redis_server: RedisServer, redis: Redis, origins: str
) -> None:
    async with ops_api(redis_server, redis, cors_origins=origins) as (client, env):
        resp = await client.http.options(
            "/v1/jobs",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        allowed = resp.headers.get("access-control-allow-origin")
        assert allowed == (origins or None)
