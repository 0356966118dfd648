"""Job state on a Redis Cluster, the queue on a Redis of its own (two planes), when the
queue's Redis comes back empty: what arq held (queued attempts, the leases of running
ones) is gone while the jobs are not. A queued job is queued again and runs; a running
job's lease is taken again, so a worker killed after that still has its job re-run."""

from __future__ import annotations

import asyncio
import secrets
import signal
from collections.abc import Iterator

import httpx
import pytest
import redis

from pushsvc.keys import Keys
from pushsvc.tools.cluster import LocalCluster

from ..conftest import stack_env, worker
from ..procs import Api, RedisServer, wait_until
from ..sse import Stream
from .test_cluster import PATIENCE, follow
from .test_redis_outages import assert_seamless, describe, submit

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def planes(data_cluster: LocalCluster) -> Iterator[tuple[RedisServer, Api, dict[str, str]]]:
    """A queue Redis of its own (no persistence: a restart comes back empty), the data
    cluster, and an API that sweeps each second."""
    queue = RedisServer().start()
    env = stack_env(
        queue.url, f"p{secrets.token_hex(3)}", data_cluster=data_cluster.seeds, outbox_sweep_s="1"
    )
    api = Api([], env).start()
    try:
        yield queue, api, env
    finally:
        api.stop()
        queue.stop()


def http(api: Api) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=api.url, headers={"Authorization": "Bearer key-a"}, timeout=PATIENCE
    )


async def test_a_queued_job_runs_after_the_queue_came_back_empty(
    planes: tuple[RedisServer, Api, dict[str, str]],
) -> None:
    queue, api, env = planes
    async with http(api) as c:
        job_id = await submit(c, {"steps": 3, "interval_ms": 10})  # no worker yet
        queue.kill()
        queue.start()  # empty: arq's queue lost the attempt; the job is still queued
        assert (await c.get(f"/v1/jobs/{job_id}")).json()["status"] == "queued"
        with worker(env):
            stream = await follow(c, f"/v1/jobs/{job_id}/events", Stream(), timeout=60)
        assert stream.events[-1].kind == "completed", describe(stream.events)
        assert_seamless(stream.events)


async def test_a_running_jobs_lease_is_taken_again_after_the_queue_came_back_empty(
    planes: tuple[RedisServer, Api, dict[str, str]],
) -> None:
    queue, api, env = planes
    leases = Keys(env["PUSHSVC_NAMESPACE"]).leases

    def leased() -> bool:  # the worker's doing: another process
        with redis.Redis.from_url(queue.url, socket_timeout=2) as q:
            return bool(q.zcard(leases))

    async with http(api) as c:
        with worker(env) as first:
            job_id = await submit(c, {"steps": 400, "interval_ms": 20})
            await asyncio.to_thread(wait_until, leased, 30, "the job's lease")  # running
            queue.kill()
            queue.start()  # empty: the lease is gone, the job runs on
            assert not leased()
            await asyncio.to_thread(wait_until, leased, 30, "the lease taken again")
            first.signal(signal.SIGKILL)  # only its lease lapsing gets the job re-run
        with worker(env):
            stream = await follow(c, f"/v1/jobs/{job_id}/events", Stream(), timeout=90)
        assert stream.events[-1].kind == "completed", describe(stream.events)
