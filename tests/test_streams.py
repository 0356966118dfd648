"""The push guarantees of docs/contract.md, each against real servers and sockets."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from pushsvc.streams import REPLAY_PAGE
from pushsvc.worker import worker_session

from .conftest import Client, make_client, settings_for, stack_env
from .procs import Api, Proc, RedisServer
from .sse import TERMINAL, Stream, assert_gap_free, events, metrics, output_of, read, settled

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


@pytest.mark.parametrize("bad", ["abc", "-1", "1.5.5", "1.a-b", "9" * 30])
async def test_malformed_last_event_id_is_400(client: Client, bad: str) -> None:
    job = await client.submit("ticker", {"steps": 1, "interval_ms": 0})
    resp = await client.http.get(url(job), headers={"Last-Event-ID": bad})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "bad_event_id"


@pytest.mark.parametrize("bad", ["\u00b2", "\u00b3", "\uff13", "1\u00b2", "12."])
async def test_non_ascii_digits_in_a_last_event_id_are_400_not_500(
    client: Client, bad: str
) -> None:
    """Was: ``"²".isdigit()`` is true and ``int("²")`` fails: a 500 on every stream
    endpoint; a fullwidth "３" was taken as 3."""
    job = await client.submit("ticker", {"steps": 1, "interval_ms": 0})
    for path in (url(job), "/v1/events", f"/v1/events?job={job['id']}"):
        sep = "&" if "?" in path else "?"
        resp = await client.http.get(f"{path}{sep}last_event_id={bad}")
        assert resp.status_code == 400, (path, resp.status_code, resp.text)
        assert resp.json()["error"]["code"] == "bad_event_id"


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


async def test_heartbeat_retry_and_headers(redis_server: RedisServer) -> None:
    """Guarantee 6: comments keep idle streams alive; retry hint; no buffering/compression."""
    env = stack_env(redis_server.url, "hb", heartbeat_s="0.2")
    api = Api([], env).start()
    try:
        async with httpx.AsyncClient(
            base_url=api.url, headers={"Authorization": "Bearer key-a"}
        ) as http:
            job = (await http.post("/v1/jobs", json={"type": "ticker", "payload": SLOW})).json()
            lines: list[str] = []
            headers = {"Accept-Encoding": "gzip"}
            async with http.stream("GET", url(job), headers=headers) as resp:
                assert resp.headers["x-accel-buffering"] == "no"
                assert resp.headers["content-type"].startswith("text/event-stream")
                assert "content-encoding" not in resp.headers
                async for line in resp.aiter_lines():
                    lines.append(line)
                    if line.startswith(":"):
                        break
            assert lines[0] == "retry: 2000"
            assert any(line.startswith("event: snapshot") for line in lines)
    finally:
        api.stop()


async def test_heartbeats_between_events_repeat_nothing(
    redis_server: RedisServer, redis: Redis
) -> None:
    """Regression: after a heartbeat the stream sent its previous frames again."""
    env = stack_env(redis_server.url, f"hb{secrets.token_hex(3)}", heartbeat_s="0.1")
    api, worker = Api([], env).start(), Proc(["worker"], env).start()
    client = make_client(api.url, "key-a", redis, env["PUSHSVC_NAMESPACE"])
    try:
        job = await client.submit("ticker", {"steps": 4, "interval_ms": 350})
        for path in (url(job), f"/v1/events?job={job['id']}"):
            stream = await read(client.http, path)
            assert stream.closed and stream.events[-1].kind == "completed"
            ids = [e.id for e in stream.events]
            assert len(ids) == len(set(ids)) or path.startswith("/v1/events")
            assert_gap_free(stream, job["id"])
        live = await read(
            client.http, url(await client.submit("ticker", {"steps": 4, "interval_ms": 350}))
        )
        assert [e.id for e in live.events] == sorted({e.id for e in live.events})
    finally:
        await client.http.aclose()
        api.stop()
        worker.stop()


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


async def test_named_job_of_another_tenant_is_404_on_streams(
    client_factory: Callable[..., Client],
) -> None:
    owner, other = client_factory("key-m"), client_factory("key-n")
    job = await owner.submit("ticker", {"steps": 1, "interval_ms": 0})
    for path in (url(job), f"/v1/events?job={job['id']}"):
        resp = await other.http.get(path)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "job_not_found"


@pytest.fixture
async def lone_api(redis_server: RedisServer, redis: Redis) -> AsyncIterator[Client]:
    """An API process of its own, so its counters see only this test's streams."""
    api = Api([], stack_env(redis_server.url, "lone")).start()
    c = make_client(api.url, "key-o", redis, "lone")
    c.api = api  # type: ignore[attr-defined]
    yield c
    await c.http.aclose()
    api.stop()


async def _connect_and_drop(http: httpx.AsyncClient, path: str, times: int) -> None:
    for _ in range(times):
        async for event in events(http, path):
            assert event.kind == "snapshot"
            break


@pytest.mark.timeout(180)
async def test_connect_disconnect_cycles_leak_nothing(lone_api: Client) -> None:
    client = lone_api
    job = await client.submit("ticker", {"steps": 10000, "interval_ms": 50})
    paths = [url(job), f"/v1/events?job={job['id']}", "/v1/events"]
    await asyncio.gather(*(_connect_and_drop(client.http, p, 20) for p in paths))
    before = await settled(client.http, 0)
    await asyncio.gather(*(_connect_and_drop(client.http, paths[i % 3], 100) for i in range(10)))
    after = await settled(client.http, 0)
    await client.http.delete(f"/v1/jobs/{job['id']}")
    assert after["pushsvc_bus_channels"] == 0
    assert after["pushsvc_asyncio_tasks"] <= before["pushsvc_asyncio_tasks"]
    assert after["pushsvc_stream_buffered_bytes"] == 0
    assert after["pushsvc_process_rss_bytes"] - before["pushsvc_process_rss_bytes"] < 8 << 20


@pytest.mark.timeout(120)
async def test_redis_connections_do_not_grow_with_open_streams(
    lone_api: Client, redis_server: RedisServer
) -> None:
    import psutil

    client = lone_api
    job = await client.submit("ticker", {"steps": 10000, "interval_ms": 50})
    opened = 0
    done = asyncio.Event()

    async def hold(path: str) -> None:
        nonlocal opened
        async for _ in events(client.http, path):
            opened += 1
            await done.wait()
            return

    paths = [url(job), f"/v1/events?job={job['id']}"]
    limits = httpx.Limits(max_connections=400)
    async with httpx.AsyncClient(
        base_url=client.http.base_url, headers=client.http.headers, limits=limits, timeout=30
    ) as http:
        client.http, original = http, client.http
        tasks = [asyncio.create_task(hold(paths[i % 2])) for i in range(300)]
        stats = await settled(original, 300)
        pid = client.api.proc.pid  # type: ignore[attr-defined]
        to_redis = [
            c
            for c in psutil.Process(pid).net_connections("tcp")
            if c.raddr and c.raddr.port == redis_server.port
        ]
        done.set()
        await asyncio.gather(*tasks)
        client.http = original
    await client.http.delete(f"/v1/jobs/{job['id']}")
    assert stats["pushsvc_redis_connections"] <= 3
    assert len(to_redis) <= 3, to_redis
    assert stats["pushsvc_bus_channels"] == 2  # one job channel, one tenant channel


@pytest.mark.timeout(30)
async def test_head_on_an_open_stream_answers_and_completes(client: Client) -> None:
    """HEAD of a running job's stream gets the stream's headers and an end: with
    sse-starlette before 3.6 it never completed (the floor in pyproject.toml)."""
    job = await client.submit("ticker", {"steps": 200, "interval_ms": 100})  # 20 s
    await client.wait(job["id"], lambda j: j["status"] == "running")
    for path in (url(job), "/v1/events"):
        async with asyncio.timeout(10):
            resp = await client.http.head(path)
        assert resp.status_code == 200, path
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.content == b""
    await client.http.delete(f"/v1/jobs/{job['id']}")
