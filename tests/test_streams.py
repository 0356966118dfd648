"""What a stream sends (pushsvc/streams.py): the push guarantees of docs/contract.md, each
against real servers and sockets (the endpoints themselves: tests/test_sse.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from pushsvc.streams import REPLAY_PAGE
from pushsvc.worker import worker_session

from .conftest import Client, make_client, settings_for, stack_env
from .procs import Api, Proc, RedisServer
from .sse import TERMINAL, Stream, assert_gap_free, events, metrics, output_of, read

SLOW = {"steps": 30, "interval_ms": 30}


def url(job: dict[str, Any]) -> str:
    return f"/v1/jobs/{job['id']}/events"


async def test_every_subscriber_gets_a_snapshot_then_every_event_once(client: Client) -> None:
    """Guarantee 1, for subscribers joining before, during and late in the job."""
    job = await client.submit("ticker", SLOW)
    marks = {4: asyncio.Event(), 12: asyncio.Event(), 22: asyncio.Event()}

    async def first() -> Stream:
        out = Stream()
        async for event in events(client.http, url(job)):
            out.events.append(event)
            for seq, mark in marks.items():
                if event.data["seq"] >= seq:
                    mark.set()
        out.closed = True
        for mark in marks.values():  # anyone still waiting joins after the end
            mark.set()
        return out

    async def joiner(seq: int) -> Stream:
        await marks[seq].wait()
        return await read(client.http, url(job))

    streams = await asyncio.gather(first(), *(joiner(s) for s in marks))
    final = await client.get(job["id"])
    for stream in streams:
        assert stream.closed and stream.events[0].kind == "snapshot"
        assert stream.events[-1].kind == "completed" and stream.last_id == final["seq"]
        assert_gap_free(stream, job["id"])
    assert [e.data["progress"] for e in streams[0].events[1:] if e.kind == "progress"] == sorted(
        e.data["progress"] for e in streams[0].events if e.kind == "progress"
    )


@pytest.mark.parametrize("how", ["header", "query"])
async def test_resume_continues_with_exactly_the_events_after(client: Client, how: str) -> None:
    """Guarantee 2."""
    job = await client.submit("ticker", SLOW)
    head = await read(client.http, url(job), stop=lambda s: s.last_id >= 8)
    last = head.last_id
    if how == "header":
        tail = await read(client.http, url(job), headers={"Last-Event-ID": str(last)})
    else:
        tail = await read(client.http, f"{url(job)}?last_event_id={last}")
    assert tail.closed and tail.events[0].kind != "snapshot"
    ids = [e.id for e in tail.events]
    assert ids == list(range(last + 1, last + 1 + len(ids)))
    assert tail.events[-1].kind == "completed"
    assert ids[-1] == (await client.get(job["id"]))["seq"]


async def test_resume_past_the_kept_log_gets_a_reset_snapshot(
    isolated: tuple[Client, RedisServer, str],
) -> None:
    """Guarantee 2: history that is gone is never skipped silently."""
    client, server, ns = isolated
    job = await client.submit("ticker", {"steps": 200, "interval_ms": 0})
    settings = settings_for(stack_env(server.url, ns)).model_copy(
        update={"job_log_cap": 10, "publish_rate_hz": 100000}
    )
    async with worker_session(settings, burst=True, handle_signals=False) as worker:
        await worker.async_run()
    stream = await read(client.http, url(job), headers={"Last-Event-ID": "2"})
    assert [e.kind for e in stream.events] == ["snapshot", "completed"]
    assert stream.events[0].data["reset"] is True and stream.closed
    future = await read(client.http, url(job), headers={"Last-Event-ID": "999999"})
    assert future.events[0].kind == "snapshot" and future.events[0].data["reset"] is True


async def test_late_joiner_gets_snapshot_and_terminal_then_close(client: Client) -> None:
    """Guarantee 3; and a resume after the end is told to stop (204)."""
    job = await client.submit("ticker", {"steps": 2, "interval_ms": 0, "fail_at_step": 2})
    done = await client.wait(job["id"])
    stream = await read(client.http, url(job))
    assert stream.closed and [e.kind for e in stream.events] == ["snapshot", "failed"]
    assert stream.events[1].data["error"]["code"] == "ticker_failure"
    assert stream.events[0].data["status"] == "failed" and stream.last_id == done["seq"]
    resp = await client.http.get(url(job), headers={"Last-Event-ID": str(done["seq"])})
    assert resp.status_code == 204


async def test_cancelled_job_streams_its_terminal_event(client: Client) -> None:
    """Guarantee 4: the stream ends with the one terminal event."""
    job = await client.submit("ticker", {"steps": 500, "interval_ms": 20})
    got_progress = asyncio.Event()

    async def follow() -> Stream:
        out = Stream()
        async for event in events(client.http, url(job)):
            out.events.append(event)
            if event.kind == "progress":
                got_progress.set()
        out.closed = True
        return out

    reader = asyncio.create_task(follow())
    await got_progress.wait()
    await client.http.delete(f"/v1/jobs/{job['id']}")
    stream = await asyncio.wait_for(reader, 20)
    assert stream.closed and stream.events[-1].kind == "cancelled"
    assert sum(e.kind in TERMINAL for e in stream.events) == 1
    assert_gap_free(stream, job["id"])


@pytest.mark.timeout(120)
async def test_slow_reader_costs_bounded_memory_and_still_gets_everything(
    redis_server: RedisServer, redis: Redis
) -> None:
    """Guarantee 5: merge and resync under backpressure; status/terminal never lost."""
    tune = {"stream_coalesce_after": "4", "stream_max_frames": "64", "stream_max_bytes": "65536"}
    env = stack_env(redis_server.url, "slow", publish_rate_hz="100000", **tune)
    api, worker = Api([], env).start(), Proc(["worker"], env).start()
    client = make_client(api.url, "key-a", redis, "slow")
    try:
        async with httpx.AsyncClient(
            base_url=api.url, headers=client.http.headers, timeout=30
        ) as slow:
            # ~8 MB of text: more than socket buffers hold while the reader pauses.
            job = await client.submit("chatty", {"chunks": 4000, "size": 2000})
            stream = Stream()
            async for event in events(slow, url(job)):
                stream.events.append(event)
                if len(stream.events) == 1:  # stop reading until the job is over
                    await client.wait(job["id"], timeout=90)
            final = await client.get(job["id"])
            stats = await metrics(client.http)
    finally:
        await client.http.aclose()
        api.stop()
        worker.stop()
    assert final["status"] == "completed" and stream.events[-1].kind == "completed"
    assert output_of(stream) == final["output"]  # no text lost, none doubled
    assert len(stream.events) < 8000  # frames were merged or resynced
    assert stats["pushsvc_frames_merged_total"] + stats["pushsvc_stream_resyncs_total"] > 0
    assert stats["pushsvc_stream_buffered_bytes"] <= 65536


async def _both_jobs(client: Client) -> tuple[dict[str, Any], dict[str, Any]]:
    a = await client.submit("ticker", {"steps": 15, "interval_ms": 30})
    b = await client.submit("ticker", {"steps": 10, "interval_ms": 40, "fail_at_step": 10})
    return a, b


async def test_multiplexed_stream_keeps_each_jobs_guarantees(
    client_factory: Callable[..., Client],
) -> None:
    """Guarantee 7, named jobs: per-job order, no gaps, closes when all have ended."""
    client = client_factory("key-i")
    a, b = await _both_jobs(client)
    stream = await read(client.http, f"/v1/events?job={a['id']}&job={b['id']}")
    assert stream.closed
    for job, end in ((a, "completed"), (b, "failed")):
        evs = stream.of(job["id"])
        assert evs[0].kind == "snapshot" and evs[-1].kind == end
        assert_gap_free(stream, job["id"])
    ids = [e.id for e in stream.events]
    assert ids == sorted(ids)  # the stream's own cursor never goes back


async def test_multiplexed_stream_resumes_by_its_own_cursor(
    client_factory: Callable[..., Client],
) -> None:
    """Guarantee 7: the multiplexed stream is itself resumable with Last-Event-ID."""
    client = client_factory("key-j")
    a, b = await _both_jobs(client)
    path = f"/v1/events?job={a['id']}&job={b['id']}"
    head = await read(client.http, path, stop=lambda s: len(s.events) >= 8)
    tail = await read(client.http, path, headers={"Last-Event-ID": str(head.last_id)})
    assert tail.closed and tail.events[0].kind != "snapshot"
    joined = Stream(events=head.events + tail.events)
    for job in (a, b):
        final = await client.get(job["id"])
        assert_gap_free(joined, job["id"])
        assert joined.of(job["id"])[-1].data["seq"] == final["seq"]


MANY = {"steps": 600, "interval_ms": 2}  # more events than a replay reads at once


async def test_a_long_resume_arrives_whole_a_page_at_a_time(client: Client) -> None:
    """A replay reads the log a page at a time (REPLAY_PAGE) and still sends every event
    after the resume point once, in order, and no reset."""
    job = await client.wait((await client.submit("ticker", MANY))["id"])
    assert job["seq"] > 2 * REPLAY_PAGE
    tail = await read(client.http, url(job), headers={"Last-Event-ID": "1"})
    assert tail.closed and tail.events[-1].kind == "completed"
    assert [e.id for e in tail.events] == list(range(2, job["seq"] + 1))
    assert not any(e.kind == "snapshot" for e in tail.events)


async def test_a_named_resume_reads_past_pages_of_other_jobs(
    client_factory: Callable[..., Client],
) -> None:
    """A named multiplexed stream resumed where the tenant log holds pages of other jobs'
    events moves on past them: the next page starts after the last one read, not after
    the last event the stream sent (that page would be read again and again)."""
    client = client_factory("key-k")
    other = await client.wait((await client.submit("ticker", MANY))["id"])
    first = await client.redis.xrange(client.keys.job_log(other["id"]), count=1)
    tseq = int(first[0][1][b"t"]) - 1  # the tenant's position before the other job
    tepoch = await client.redis.hget(client.keys.tenant_position("tenant-k"), "epoch")
    job = await client.wait((await client.submit("ticker", {"steps": 3}))["id"])
    resume = {"Last-Event-ID": f"{tseq}.{(tepoch or b'').decode()}"}
    stream = await read(client.http, f"/v1/events?job={job['id']}", headers=resume)
    assert stream.closed and stream.events[-1].kind == "completed"
    logged = [(kind, data["seq"]) for kind, data in await client.log(job["id"])]
    assert [(e.kind, e.data["seq"]) for e in stream.events] == logged


async def test_all_jobs_stream_includes_jobs_submitted_after_connecting(
    client_factory: Callable[..., Client],
) -> None:
    """Guarantee 7, all of a tenant's jobs; another tenant's jobs never show up."""
    client, other = client_factory("key-k"), client_factory("key-l")
    connected = asyncio.Event()
    seen = Stream()
    ended: set[str] = set()
    jobs: list[str] = []

    async def follow() -> None:
        async for event in events(client.http, "/v1/events"):
            connected.set()
            seen.events.append(event)
            if event.kind in TERMINAL:
                ended.add(event.data["job_id"])
            if jobs and set(jobs) <= ended:
                return

    # Something to receive first, so that "connected" is observable from the client.
    warm = await client.submit("ticker", {"steps": 3, "interval_ms": 300})
    reader = asyncio.create_task(follow())
    await connected.wait()
    foreign = await other.submit("ticker", {"steps": 1, "interval_ms": 0})
    jobs += [
        (await client.submit("ticker", {"steps": 5, "interval_ms": 10}))["id"] for _ in range(2)
    ]
    jobs.append(warm["id"])
    await asyncio.wait_for(reader, 20)
    for job_id in jobs:
        assert_gap_free(seen, job_id)
        assert seen.of(job_id)[0].kind == "snapshot"
    assert seen.of(foreign["id"]) == []
