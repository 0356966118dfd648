"""One job's stream (pushsvc/job_stream.py): the push guarantees of docs/contract.md for
``/v1/jobs/{id}/events``, against real servers and sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pushsvc.worker import worker_session

from .conftest import Client, settings_for, stack_env
from .procs import RedisServer
from .sse import TERMINAL, Stream, assert_gap_free, events, read

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
