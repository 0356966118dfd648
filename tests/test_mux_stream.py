"""Many jobs over one stream (pushsvc/mux_stream.py): ``/v1/events``, named jobs or all
of a tenant's, against real servers and sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .conftest import Client
from .sse import TERMINAL, Stream, assert_gap_free, events, read
from .test_streams import MANY


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


async def test_a_named_resume_reads_past_pages_of_other_jobs(
    client_factory: Callable[..., Client],
) -> None:
    """A named multiplexed stream resumed where the tenant log holds pages of other jobs'
    events moves on past them: the next page starts after the last one read, not after
    the last event the stream sent (that page would be read again and again)."""
    client = client_factory("key-k")
    other = await client.wait((await client.submit("ticker", MANY))["id"])
    first = await client.redis.xrange(client.keys.job_log(client.tenant, other["id"]), count=1)
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
