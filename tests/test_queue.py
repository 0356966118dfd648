"""The arq boundary (pushsvc/queue.py): what arq's own log lines say of our attempts, and
priorities (high before normal before low; a retry keeps its backoff whatever its priority)."""

from __future__ import annotations

import logging

import pytest
from redis.asyncio import Redis

from pushsvc.queue import ARQ_START_LINE, ArqDelayFilter
from pushsvc.worker import worker_session

from .conftest import TICK, Client, burst, ops_api, settings_for, stack_env, worker
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
        (" delayed=1000000000.05s", ""),  # normal, started at once
        (" delayed=2000000000.00s", ""),  # high
        (" delayed=1000000001.20s", ""),  # within arq's 1.2 s: not worth a word, as arq has it
        (" delayed=1000000005.00s", " delayed=5.00s"),  # normal, 5 s late
        (" try=2 delayed=2000000012.34s", " try=2 delayed=12.34s"),
        (" delayed=3.50s", " delayed=3.50s"),  # low priority: no offset
    ],
)
def test_arq_start_line_gets_the_real_delay(shown: str, means: str) -> None:
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
