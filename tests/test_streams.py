"""What every stream does (pushsvc/streams.py): backpressure (merge, resync) and paged
replays, against real servers and sockets (the endpoints: tests/test_sse.py; one job's
stream: tests/test_job_stream.py; many jobs': tests/test_mux_stream.py)."""

from __future__ import annotations

import httpx
import pytest
from redis.asyncio import Redis

from pushsvc.streams import REPLAY_PAGE

from .conftest import Client, make_client, stack_env
from .procs import Api, Proc, RedisServer
from .sse import Stream, events, metrics, output_of, read
from .test_job_stream import url


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
