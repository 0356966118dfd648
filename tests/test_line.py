"""Places in line (pushsvc/line.py): a queued job's ``queue_position`` and ``starts_in_s``
in its snapshot, in the listing, and pushed to its streams as ``queue`` events as it moves
up; null for jobs that are not in arq's queue (running, finished, waiting for a retry)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from pushsvc.line import MIN_SPAN_S, Place, moved, start_rate, starts_in

from .conftest import Client, burst, ops_api, worker
from .procs import RedisServer
from .sse import Event, events

LONG = {"steps": 600, "interval_ms": 100}  # a minute: runs until cancelled


def place(position: int | None, starts: float | None = None, seq: int = 1) -> Place:
    return Place("queued", seq, "e", position, starts)


def test_a_place_is_news_when_it_moved_enough() -> None:
    assert moved(None, place(3)) and not moved(None, place(None))
    assert moved(place(3), place(2)) and moved(place(3), place(None))
    assert moved(place(3), place(3, seq=2))  # the client holds another seq
    assert not moved(place(1000), place(990)) and moved(place(1000), place(980))
    assert not moved(place(5, 100.0), place(5, 96.0)) and moved(place(5, 100.0), place(5, 94.0))
    assert not moved(place(5, 3.0), place(5, 2.5)) and moved(place(5, 3.0), place(5, 1.5))
    assert moved(place(5, None), place(5, 3.0))


def test_the_start_rate_counts_from_the_first_start_of_the_window() -> None:
    now = 1000.5
    assert start_rate([0] * 60, now) is None
    # 10 a second for the last 30 s of an otherwise idle window: 10/s, not 300/60.
    rate = start_rate([0] * 30 + [10] * 30, now)
    assert rate == pytest.approx(300 / 29.5)  # from 971.0 (the first start) to 1000.5
    # One start just now is not a rate of one a second.
    assert start_rate([0] * 59 + [1], now) == 1 / MIN_SPAN_S
    assert starts_in(4, 2.0) == 2.0 and starts_in(None, 2.0) is None and starts_in(3, None) is None


class Watch:
    """One stream's events, with the ``queue`` ones, read in the background."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.changed = asyncio.Event()

    async def read(self, client: Client, path: str) -> None:
        async for event in events(client.http, path, queue=True):
            self.events.append(event)
            self.changed.set()

    def places(self, job_id: str) -> list[int | None]:
        return [e.data["queue_position"] for e in self.queued(job_id)]

    def queued(self, job_id: str) -> list[Event]:
        return [e for e in self.events if e.kind == "queue" and e.data["job_id"] == job_id]

    async def until(self, check: Callable[[], bool], timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def watching(client: Client, path: str) -> AsyncIterator[Watch]:
    watch = Watch()
    task = asyncio.create_task(watch.read(client, path))
    try:
        yield watch
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def submit(client: Client, priority: str = "normal") -> dict[str, Any]:
    body = {"type": "fragile", "payload": LONG, "priority": priority}
    resp = await client.http.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text
    job: dict[str, Any] = resp.json()
    return job


@pytest.mark.timeout(90)
async def test_places_are_shown_and_pushed_as_the_line_moves(
    redis_server: RedisServer, redis: Redis
) -> None:
    async with ops_api(redis_server, redis) as (client, env):
        first = await submit(client)
        got = await client.get(first["id"])
        assert (got["queue_position"], got["starts_in_s"]) == (1, None)  # no start measured
        with worker(env, worker_concurrency="1"):
            await client.wait(first["id"], lambda j: j["status"] == "running")
            a, b, c = [await submit(client) for _ in range(3)]
            shown = [await client.get(j["id"]) for j in (a, b, c)]
            assert [j["queue_position"] for j in shown] == [1, 2, 3]
            assert all(isinstance(j["starts_in_s"], float) for j in shown)  # one start seen
            listed = (await client.http.get("/v1/jobs", params={"status": "queued"})).json()
            assert {j["id"]: j["queue_position"] for j in listed["jobs"]} == {
                a["id"]: 1,
                b["id"]: 2,
                c["id"]: 3,
            }
            mux = f"/v1/events?job={b['id']}&job={c['id']}"
            async with (
                watching(client, f"/v1/jobs/{a['id']}/events") as one,
                watching(client, mux) as many,
            ):
                # Right after its snapshot, without waiting for the tick.
                await one.until(lambda: one.places(a["id"]) == [1])
                await many.until(lambda: (many.places(b["id"]), many.places(c["id"])) == ([2], [3]))
                assert one.events[0].kind == "snapshot" and one.queued(a["id"])[0].data["seq"] == 1

                high = await submit(client, "high")
                assert (await client.get(high["id"]))["queue_position"] == 1
                await one.until(lambda: one.places(a["id"]) == [1, 2])
                await many.until(lambda: many.places(c["id"]) == [3, 4])
                assert many.places(b["id"]) == [2, 3]

                await client.http.delete(f"/v1/jobs/{first['id']}")
                await client.wait(high["id"], lambda j: j["status"] == "running")
                await one.until(lambda: one.places(a["id"]) == [1, 2, 1])
                await many.until(lambda: many.places(c["id"]) == [3, 4, 3])
                assert many.places(b["id"]) == [2, 3, 2]
                assert isinstance(one.queued(a["id"])[-1].data["starts_in_s"], float)
            for job in (first, high):  # cancelled, running: not in line
                got = await client.get(job["id"])
                assert (got["queue_position"], got["starts_in_s"]) == (None, None)


@pytest.mark.timeout(60)
async def test_a_job_waiting_for_its_retry_is_not_in_line(
    redis_server: RedisServer, redis: Redis
) -> None:
    """Its attempt waits in pushsvc's delayed set, not in arq's queue: it says ``waiting``."""
    async with ops_api(redis_server, redis) as (client, env):
        payload = {"steps": 1, "interval_ms": 0, "fail_at_step": 1, "fail_retryable": True}
        job = await client.submit("ticker", payload)
        # Full jitter up to an hour: the retry is due long after this test.
        await burst(env, retry_base_s=3600.0, retry_max_s=3600.0)
        got = await client.get(job["id"])
        assert got["status"] == "queued" and got["waiting"]["reason"] == "backoff"
        assert got["waiting"]["until"] > time.time()
        assert (got["queue_position"], got["starts_in_s"]) == (None, None)


@pytest.mark.timeout(60)
async def test_a_resumed_stream_of_a_queued_job_gets_its_place(
    redis_server: RedisServer, redis: Redis
) -> None:
    """A resume sends no snapshot or status when nothing happened since; the place is
    pushed all the same (it is no event of the log, so none is replayed)."""
    async with ops_api(redis_server, redis) as (client, _env):
        ahead, job = await submit(client), await submit(client)
        path = f"/v1/jobs/{job['id']}/events"
        async with watching(client, path) as fresh:
            await fresh.until(lambda: fresh.places(job["id"]) == [2])
        last_id = fresh.events[0].raw_id  # the snapshot's: the queue event has no id
        async with watching(client, f"{path}?last_event_id={last_id}") as resumed:
            await resumed.until(lambda: resumed.places(job["id"]) == [2])
            assert [e.kind for e in resumed.events] == ["queue"]
        assert ahead["id"] != job["id"]


@pytest.mark.timeout(60)
async def test_a_resumed_multiplexed_stream_gets_the_places_of_its_named_queued_jobs(
    redis_server: RedisServer, redis: Redis
) -> None:
    """Review finding: a resumed ``/v1/events?job=`` had sent nothing of a queued job that
    did not change since the cursor, so its places were never pushed (every EventSource
    reconnect, every tab leader handover). (An all-jobs stream, resumed, learns of such
    jobs at their next event: it reads no view on a resume.)"""
    async with ops_api(redis_server, redis) as (client, _env):
        await submit(client)
        job = await submit(client)
        path = f"/v1/events?job={job['id']}"
        async with watching(client, path) as fresh:
            await fresh.until(lambda: fresh.places(job["id"]) == [2])
        last_id = [e for e in fresh.events if e.kind != "queue"][-1].raw_id
        async with watching(client, f"{path}&last_event_id={last_id}") as resumed:
            await resumed.until(lambda: resumed.places(job["id"]) == [2])
