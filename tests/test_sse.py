"""The stream endpoints (pushsvc/sse.py) over real sockets: Last-Event-ID parsing, headers
and heartbeats, tenants, open-stream limits, HEAD, and what open and closed streams leave
behind (the streams' own guarantees: tests/test_streams.py)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from redis.asyncio import Redis

from .conftest import Client, make_client, ops_api, stack_env
from .procs import Api, Proc, RedisServer
from .sse import assert_gap_free, events, read, settled
from .test_job_stream import SLOW, url


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


async def test_named_job_of_another_tenant_is_404_on_streams(
    client_factory: Callable[..., Client],
) -> None:
    owner, other = client_factory("key-m"), client_factory("key-n")
    job = await owner.submit("ticker", {"steps": 1, "interval_ms": 0})
    for path in (url(job), f"/v1/events?job={job['id']}"):
        resp = await other.http.get(path)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "job_not_found"
        # A resume too: its job is not the tenant's, not a job the store lost.
        resp = await other.http.get(path, headers={"Last-Event-ID": "1"})
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
    after = await settled(client.http, 0, tasks_at_most=before["pushsvc_asyncio_tasks"])
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
