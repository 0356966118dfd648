"""The arq boundary (pushsvc/queue.py): what arq's own log lines say of our attempts,
priorities (high before normal before low; a retry keeps its backoff whatever its
priority), and fair share (tenants take turns within a class)."""

from __future__ import annotations

import logging
import time

import pytest
from redis.asyncio import Redis

from pushsvc.queue import ARQ_START_LINE, ArqDelayFilter
from pushsvc.worker import worker_session

from .conftest import (
    TICK,
    Client,
    burst,
    make_client,
    ops_api,
    settings_for,
    stack_env,
    worker,
)
from .procs import RedisServer


def _arq_line(extra: str) -> str:
    record = logging.getLogger("arq.worker").makeRecord(
        "arq.worker", logging.INFO, __file__, 1, ARQ_START_LINE, (0.05, "j:run", "'x'", extra), None
    )
    assert ArqDelayFilter().filter(record)
    return record.getMessage()


@pytest.mark.parametrize(
    ("shown", "means"),
    [
        ("", ""),
        (" delayed=2001765000000000.05s", ""),  # normal: a turn, not a time
        (" delayed=3001765000001000.00s", ""),  # high
        (" try=2 delayed=1001765000012000.34s", " try=2"),
    ],
)
def test_arq_start_line_drops_the_meaningless_delay(shown: str, means: str) -> None:
    assert _arq_line(shown) == f"  0.05s → j:run('x'){means}"


def test_other_arq_lines_pass_unchanged() -> None:
    record = logging.makeLogRecord({"msg": "%s delayed=1000000000.00s", "args": ("x",)})
    assert ArqDelayFilter().filter(record) and record.getMessage() == "x delayed=1000000000.00s"


@pytest.mark.timeout(60)
async def test_the_worker_no_longer_says_every_job_was_delayed_for_31_years(
    isolated: tuple[Client, RedisServer, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Bug: arq's start line read ``delayed=1000000000.05s`` for every normal job (and
    2000000000 for high ones): arq takes start minus score, our scores carry an offset."""
    client, server, namespace = isolated
    tick = {"steps": 1, "interval_ms": 0}
    jobs = [
        await client.submit("ticker", tick),
        (
            await client.http.post(
                "/v1/jobs", json={"type": "ticker", "payload": tick, "priority": "high"}
            )
        ).json(),
    ]
    caplog.set_level(logging.INFO, logger="arq.worker")
    settings = settings_for(stack_env(server.url, namespace))
    async with worker_session(settings, burst=True, handle_signals=False) as worker:
        await worker.async_run()
    starts = [r.getMessage() for r in caplog.records if r.msg == ARQ_START_LINE]
    assert len(starts) == len(jobs), starts
    for job in jobs:
        (line,) = [s for s in starts if job["id"] in s]
        assert "delayed=" not in line, line


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


async def _submit_many(client: Client, n: int) -> list[str]:
    return [(await client.submit("ticker", TICK))["id"] for _ in range(n)]


@pytest.mark.timeout(90)
async def test_one_tenants_burst_does_not_keep_another_tenants_job_waiting(
    redis_server: RedisServer, redis: Redis
) -> None:
    """Before fair share, tenant-b's one job waited behind all 20 of tenant-a's (FIFO)."""
    async with ops_api(redis_server, redis) as (a, env):
        b = make_client(str(a.http.base_url), "key-b", redis, env["PUSHSVC_NAMESPACE"])
        burst_ids = await _submit_many(a, 20)
        (late,) = await _submit_many(b, 1)
        await burst(env, worker_concurrency=1)
        jobs = [await a.get(i) for i in burst_ids] + [await b.get(late)]
        order = [j["id"] for j in sorted(jobs, key=lambda j: j["started_at"])]
        assert order.index(late) <= 1, order.index(late)  # it takes the clock's turn
        assert [i for i in order if i != late] == burst_ids  # one tenant: first in, first out
        await b.http.aclose()


@pytest.mark.timeout(90)
async def test_without_fair_share_the_queue_is_first_in_first_out(
    redis_server: RedisServer, redis: Redis
) -> None:
    async with ops_api(redis_server, redis, fair_share="false") as (a, env):
        b = make_client(str(a.http.base_url), "key-b", redis, env["PUSHSVC_NAMESPACE"])
        ids = await _submit_many(a, 5) + await _submit_many(b, 1) + await _submit_many(a, 2)
        await burst(env, worker_concurrency=1, fair_share=False)
        jobs = [await a.get(i) for i in ids[:5] + ids[6:]] + [await b.get(ids[5])]
        assert [j["id"] for j in sorted(jobs, key=lambda j: j["started_at"])] == ids
        await b.http.aclose()


@pytest.mark.timeout(90)
async def test_a_tenants_weight_gives_it_that_many_turns(
    redis_server: RedisServer, redis: Redis
) -> None:
    """Weight 2 against 1: turns 0, 500, 1000... against 0, 1000...: of the first nine
    starts (every turn below 3000), six are the heavier tenant's."""
    async with ops_api(redis_server, redis, tenant_weights="tenant-a=2") as (a, env):
        b = make_client(str(a.http.base_url), "key-b", redis, env["PUSHSVC_NAMESPACE"])
        ids_a, ids_b = await _submit_many(a, 10), await _submit_many(b, 10)
        await burst(env, worker_concurrency=1)
        jobs = [await a.get(i) for i in ids_a] + [await b.get(i) for i in ids_b]
        first = [j["id"] for j in sorted(jobs, key=lambda j: j["started_at"])][:9]
        assert len(set(first) & set(ids_a)) == 6 and len(set(first) & set(ids_b)) == 3
        await b.http.aclose()


@pytest.mark.timeout(90)
async def test_a_tenant_that_cancelled_its_queue_takes_the_next_turn_again(
    redis_server: RedisServer, redis: Redis
) -> None:
    """Review finding: a tenant's cancelled attempts kept the turns they took, so after
    cancelling 20 its next job waited behind every other tenant's queued ones."""
    async with ops_api(redis_server, redis) as (a, env):
        b = make_client(str(a.http.base_url), "key-b", redis, env["PUSHSVC_NAMESPACE"])
        for job_id in await _submit_many(a, 20):
            assert (await a.http.delete(f"/v1/jobs/{job_id}")).status_code == 200
        others = await _submit_many(b, 5)
        (mine,) = await _submit_many(a, 1)
        await burst(env, worker_concurrency=1)
        jobs = [await b.get(i) for i in others] + [await a.get(mine)]
        order = [j["id"] for j in sorted(jobs, key=lambda j: j["started_at"])]
        assert order.index(mine) <= 1, order.index(mine)
        await b.http.aclose()


@pytest.mark.timeout(60)
async def test_attempts_queued_before_fair_share_take_turns(
    redis_server: RedisServer, redis: Redis
) -> None:
    """Review finding: an attempt left in arq's queue by the version before fair share
    (score: its time less a priority offset) sorted after every turn given since."""
    async with ops_api(redis_server, redis) as (a, env):
        old, new = await _submit_many(a, 1), await _submit_many(a, 1)
        queue = f"{env['PUSHSVC_NAMESPACE']}:queue"
        old_arq = (await a.get(old[0]))["id"]
        members = {m.decode(): s for m, s in await redis.zrange(queue, 0, -1, withscores=True)}
        (arq_id,) = [m for m in members if m.startswith(old_arq)]
        await redis.zadd(queue, {arq_id: time.time() * 1000 - 10**12})  # as it was scored
        await burst(env, worker_concurrency=1)
        jobs = [await a.get(i) for i in old + new]
        assert all(j["status"] == "completed" for j in jobs)
