"""Faults across real processes: Redis restarts and outages, streams resumed on another API.

Each test brings its own processes (a private redis-server, ``pushsvc api`` and ``pushsvc
worker``) and reads streams with httpx over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from pushsvc.keys import Keys

from ..conftest import TENANTS, stack_env
from ..procs import Api, DurableRedis, Proc, RedisServer
from ..sse import TERMINAL, Event, Stream, events

SLOW = {"steps": 40, "interval_ms": 100}  # about 4 s, one progress event per step


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def http_for(api: Api, key: str = "key-a") -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=api.url, headers=auth(key), timeout=30)


async def submit(http: httpx.AsyncClient, payload: dict[str, Any]) -> str:
    resp = await http.post("/v1/jobs", json={"type": "ticker", "payload": payload})
    assert resp.status_code == 202, resp.text
    job_id: str = resp.json()["id"]
    return job_id


async def collect(
    http: httpx.AsyncClient,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    stop: Callable[[Stream], bool] | None = None,
    out: Stream | None = None,
    timeout: float = 30,
) -> Stream:
    """Read until the server ends the stream (``closed``), ``stop`` says enough, or time is up.

    Running out of time is not an error here: the caller asserts on ``closed`` and sees
    what did arrive. ``out`` lets another task watch the events as they come.
    """
    out = out if out is not None else Stream()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            async with contextlib.aclosing(events(http, url, headers=headers)) as source:
                async for event in source:
                    out.events.append(event)
                    if stop is not None and stop(out):
                        return out
            out.closed = True
    return out


def describe(evs: list[Event]) -> list[tuple[int, str, int]]:
    return [(e.id, e.kind, e.data["seq"]) for e in evs]


def assert_seamless(evs: list[Event]) -> None:
    """Guarantees 1 and 2 for one job: a snapshot, then every later seq once and in order.

    The one allowed break is a snapshot marked ``"reset": true`` standing where events were
    no longer available (a finished job's reset snapshot comes with its terminal event,
    which carries the same seq).
    """
    assert evs and evs[0].kind == "snapshot", describe(evs[:3])
    last = evs[0].data["seq"]
    for prev, ev in zip(evs, evs[1:], strict=False):
        seq = ev.data["seq"]
        if ev.kind == "snapshot":
            assert ev.data.get("reset") is True, f"unmarked snapshot at {seq}: {describe(evs)}"
            assert seq >= last, f"reset snapshot went back to {seq} from {last}: {describe(evs)}"
        elif not (ev.kind in TERMINAL and prev.kind == "snapshot" and seq == last):
            assert seq == last + 1, f"{ev.kind} {seq} after {last}: {describe(evs)}"
        last = seq


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in (name, f"{name}_total"):
            return float(parts[1])
    raise AssertionError(f"{name} is not in /metrics:\n{text}")


@contextlib.contextmanager
def logs_on_failure(procs: list[Proc]) -> Iterator[None]:
    """Print the processes' logs (pytest shows them) when the test fails."""
    try:
        yield
    except BaseException:
        for proc in procs:
            print(f"--- {' '.join(proc.args)} ({proc.log})\n{proc.output()[-6000:]}")
        raise


async def job_log(
    redis: Redis, ns: str, job_id: str, key: str = "key-a"
) -> list[tuple[int, str, dict[str, Any]]]:
    """The job's stored events (the job of ``key``'s tenant)."""
    entries = await redis.xrange(Keys(ns).job_log(TENANTS[key], job_id))
    return [(json.loads(f[b"d"])["seq"], f[b"k"].decode(), json.loads(f[b"d"])) for _, f in entries]


async def tenant_log(
    redis: Redis, ns: str, tenant: str
) -> list[tuple[int, str, str, dict[str, Any]]]:
    """The tenant's stored events as (tenant seq, job id, kind, data)."""
    entries = await redis.xrange(Keys(ns).tenant_log(tenant))
    return [
        (int(eid.split(b"-")[1]), f[b"j"].decode(), f[b"k"].decode(), json.loads(f[b"d"]))
        for eid, f in entries
    ]


# -- 1. Redis restarted under an open stream ------------------------------------------


@pytest.fixture
def durable_stack() -> Iterator[tuple[DurableRedis, Api, list[Proc], str]]:
    """A restartable Redis that keeps its data, with one API and one worker on it."""
    server = DurableRedis().start()
    ns = f"f{secrets.token_hex(3)}"
    # Fast publishing (50 a second) so that events fall into the outage's every gap.
    env = stack_env(server.url, ns, lease_s="5", heartbeat_s="1", publish_rate_hz="50")
    procs: list[Proc] = []
    try:
        procs.append(Proc(["worker"], env).start())
        api = Api([], env).start()
        procs.append(api)
        yield server, api, procs, ns
    finally:
        for proc in reversed(procs):
            proc.stop()
        server.stop()


@pytest.mark.timeout(90)
async def test_redis_restart_mid_stream_loses_no_event(
    durable_stack: tuple[DurableRedis, Api, list[Proc], str],
) -> None:
    server, api, procs, ns = durable_stack
    with logs_on_failure(procs):
        async with http_for(api) as http:
            job_id = await submit(http, {"steps": 200, "interval_ms": 20})
            job_stream, mux_stream = Stream(), Stream()
            warmed_up = asyncio.Event()

            def progressing(s: Stream) -> bool:
                if sum(e.kind == "progress" for e in s.events) >= 20:
                    warmed_up.set()
                return False

            tasks = [
                asyncio.create_task(
                    collect(http, f"/v1/jobs/{job_id}/events", stop=progressing, out=job_stream)
                ),
                asyncio.create_task(collect(http, f"/v1/events?job={job_id}", out=mux_stream)),
            ]
            try:
                async with asyncio.timeout(20):
                    await warmed_up.wait()
                before = len(job_stream.events)
                await asyncio.to_thread(server.restart)  # the readers keep reading meanwhile
                back_at = time.time()
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            assert not any(e.kind in TERMINAL for e in job_stream.events[:before])
            for stream in (job_stream, mux_stream):
                assert stream.closed, f"stream never ended: {describe(stream.events)}"
                assert stream.events[-1].kind == "completed", describe(stream.events)
                # Finished after Redis came back: the restart really was mid-job.
                assert stream.events[-1].data["ts"] > back_at
                assert_seamless(stream.events)
            mux_ids = [e.id for e in mux_stream.events[1:]]
            assert mux_ids == sorted(set(mux_ids)), describe(mux_stream.events)

            async with Redis.from_url(server.url) as redis:
                stored = await job_log(redis, ns, job_id)
            if not any(e.data.get("reset") for e in job_stream.events):
                after = job_stream.events[0].data["seq"]
                seen = [(e.data["seq"], e.kind, e.data) for e in job_stream.events[1:]]
                assert seen == [entry for entry in stored if entry[0] > after]

            assert api.proc is not None and api.proc.poll() is None, "the API process died"
            assert (await http.get("/healthz")).status_code == 200
            snap = (await http.get(f"/v1/jobs/{job_id}")).json()
            assert snap["status"] == "completed" and snap["seq"] == stored[-1][0]
            resp = await http.get("/metrics")
            assert resp.status_code == 200
            assert metric(resp.text, "pushsvc_redis_reconnects") >= 1


# -- 2. Redis down when a stream connects -----------------------------------------------


def assert_unavailable(resp: httpx.Response) -> None:
    assert resp.status_code == 503, (resp.status_code, resp.headers)
    assert resp.headers["content-type"].startswith("application/json")
    body = json.loads(resp.content)
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == "redis_unavailable", body


@pytest.mark.timeout(60)
@pytest.mark.parametrize("outage", ["never_up", "went_down"])
async def test_streams_answer_503_while_redis_is_down(outage: str) -> None:
    server = RedisServer()
    subscribe_timeout = 1.0
    env = stack_env(
        server.url, f"f{secrets.token_hex(3)}", stream_subscribe_timeout_s=str(subscribe_timeout)
    )
    procs: list[Proc] = []
    try:
        known: str | None = None
        if outage == "went_down":
            server.start()
        procs.append(Api([], env).start())
        api = procs[0]
        with logs_on_failure(procs):
            async with http_for(api) as http:
                if outage == "went_down":
                    known = await submit(http, {"steps": 1})  # no worker: it stays queued
                    probe = await http.get(f"/v1/jobs/{uuid.uuid4()}/events")
                    assert probe.status_code == 404  # Redis up: an unknown job is just unknown
                    server.stop()
                    # An outside process's state: poll until this API sees Redis gone.
                    async with asyncio.timeout(10):
                        while (await http.get("/readyz")).status_code != 503:
                            await asyncio.sleep(0.05)
                urls = [
                    f"/v1/jobs/{uuid.uuid4()}/events",
                    "/v1/events",
                    f"/v1/events?job={uuid.uuid4()}",
                    *([f"/v1/jobs/{known}/events", f"/v1/events?job={known}"] if known else []),
                ]
                for url in urls:
                    started = time.monotonic()
                    async with http.stream("GET", url) as resp:
                        # Checked before reading: a 200 event stream would never end.
                        assert resp.headers.get("content-type", "").startswith(
                            "application/json"
                        ), (url, resp.status_code, resp.headers)
                        await resp.aread()
                    assert_unavailable(resp)
                    assert time.monotonic() - started < subscribe_timeout + 3, url
    finally:
        for proc in procs:
            proc.stop()
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


# -- 3. Resuming on another API process --------------------------------------------------


@pytest.fixture(scope="module")
def two_apis(redis_server: RedisServer) -> Iterator[tuple[Api, Api, str, list[Proc]]]:
    """Two API processes and a worker sharing one Redis and one namespace."""
    env = stack_env(redis_server.url, f"f{secrets.token_hex(3)}")
    procs: list[Proc] = []
    try:
        procs.append(Proc(["worker"], env).start())
        api1 = Api([], env).start()
        procs.append(api1)
        api2 = Api([], env).start()
        procs.append(api2)
        yield api1, api2, env["PUSHSVC_NAMESPACE"], procs
    finally:
        for proc in reversed(procs):
            proc.stop()


@contextlib.asynccontextmanager
async def pair(
    apis: tuple[Api, Api, str, list[Proc]], key: str
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    with logs_on_failure(apis[3]):
        async with http_for(apis[0], key) as first, http_for(apis[1], key) as second:
            yield first, second


def progress_of(stream: Stream, job_id: str) -> float:
    return max((e.data["progress"] for e in stream.of(job_id) if e.kind == "progress"), default=0)


@pytest.mark.timeout(90)
async def test_job_stream_resumes_on_another_api(
    two_apis: tuple[Api, Api, str, list[Proc]], redis: Redis
) -> None:
    ns = two_apis[2]
    async with pair(two_apis, "key-a") as (api1, api2):
        job_id = await submit(api1, SLOW)
        url = f"/v1/jobs/{job_id}/events"
        first = await collect(api1, url, stop=lambda s: progress_of(s, job_id) >= 50)
        assert not first.closed and first.events[-1].kind == "progress", describe(first.events)
        assert first.events[-1].data["progress"] < 100  # left while the job ran
        second = await collect(api2, url, headers={"Last-Event-ID": str(first.last_id)})

    assert second.closed, f"resumed stream never ended: {describe(second.events)}"
    assert second.events and second.events[0].kind != "snapshot", describe(second.events)
    assert any(e.kind == "progress" for e in second.events)  # live events, not only the log
    both = first.events[1:] + second.events
    after = first.events[0].data["seq"]
    assert [e.data["seq"] for e in both] == list(range(after + 1, after + 1 + len(both)))
    assert [e.id for e in both] == [e.data["seq"] for e in both]
    assert both[-1].kind == "completed"
    stored = [entry for entry in await job_log(redis, ns, job_id) if entry[0] > after]
    assert [(e.data["seq"], e.kind, e.data) for e in both] == stored


def check_mux_resume(
    first: Stream, second: Stream, jobs: list[str], stored: list[tuple[int, str, str, Any]]
) -> None:
    """Two reads of one multiplexed stream: every event after the snapshots once, in order."""
    assert second.closed, f"resumed stream never ended: {describe(second.events)}"
    # The opening view: one snapshot per job (and a finished job's terminal event), all
    # carrying the tenant seq the view was read at.
    cursor = first.events[0].id
    n = next((i for i, e in enumerate(first.events) if e.id != cursor), len(first.events))
    heads, both = first.events[:n], first.events[n:] + second.events
    snaps = {e.data["job_id"]: e.data["seq"] for e in heads if e.kind == "snapshot"}
    assert sorted(snaps) == sorted(jobs), describe(heads)
    assert all(e.kind == "snapshot" or e.kind in TERMINAL for e in heads), describe(heads)
    assert not any(e.kind == "snapshot" for e in both), describe(both)
    assert [(e.id, e.data["job_id"], e.kind, e.data) for e in both] == [
        entry for entry in stored if entry[0] > cursor and entry[1] in jobs
    ]
    for job_id in jobs:
        mine = [e for e in both if e.data["job_id"] == job_id]
        after = snaps[job_id]
        assert [e.data["seq"] for e in mine] == list(range(after + 1, after + 1 + len(mine)))
        ending = [e for e in heads if e.data["job_id"] == job_id] + mine
        assert ending[-1].kind == "completed", describe(ending)


@pytest.mark.timeout(90)
async def test_mux_stream_resumes_on_another_api(
    two_apis: tuple[Api, Api, str, list[Proc]], redis: Redis
) -> None:
    async with pair(two_apis, "key-b") as (api1, api2):
        jobs = [await submit(api1, SLOW), await submit(api1, SLOW)]
        url = f"/v1/events?job={jobs[0]}&job={jobs[1]}"
        first = await collect(api1, url, stop=lambda s: progress_of(s, jobs[1]) >= 50)
        assert not first.closed
        assert not any(e.kind in TERMINAL for e in first.events), describe(first.events)
        second = await collect(api2, url, headers={"Last-Event-ID": str(first.last_id)})
    assert {e.data["job_id"] for e in second.events if e.kind == "progress"} == set(jobs)
    stored = await tenant_log(redis, two_apis[2], TENANTS["key-b"])
    check_mux_resume(first, second, jobs, stored)


@pytest.mark.timeout(90)
async def test_mux_stream_resumed_after_one_job_ended_still_ends(
    two_apis: tuple[Api, Api, str, list[Proc]], redis: Redis
) -> None:
    """A named multiplexed stream ends once all its jobs have; that must hold when one of
    them ended before the resume point (its terminal event is not replayed)."""
    async with pair(two_apis, "key-c") as (api1, api2):
        jobs = [await submit(api1, {"steps": 3, "interval_ms": 50}), await submit(api1, SLOW)]
        url = f"/v1/events?job={jobs[0]}&job={jobs[1]}"

        def short_one_done(s: Stream) -> bool:
            return any(e.kind == "completed" for e in s.of(jobs[0]))

        first = await collect(api1, url, stop=short_one_done)
        assert short_one_done(first) and progress_of(first, jobs[1]) < 100
        headers = {"Last-Event-ID": str(first.last_id)}
        second = await collect(api2, url, headers=headers, timeout=15)  # the job takes 4 s
    stored = await tenant_log(redis, two_apis[2], TENANTS["key-c"])
    check_mux_resume(first, second, jobs, stored)


@pytest.mark.timeout(60)
async def test_mux_stream_reconnect_after_it_ended_is_not_held_open(
    two_apis: tuple[Api, Api, str, list[Proc]],
) -> None:
    """EventSource reconnects (with Last-Event-ID) after a stream ends; once a named set
    has ended there is nothing more to send, so the answer must end too: a 204, as the
    per-job stream gives, or a stream that closes at once."""
    async with pair(two_apis, "key-d") as (api1, api2):
        quick = {"steps": 2, "interval_ms": 10}
        jobs = [await submit(api1, quick), await submit(api1, quick)]
        url = f"/v1/events?job={jobs[0]}&job={jobs[1]}"
        ended = await collect(api1, url)
        assert ended.closed and sum(e.kind == "completed" for e in ended.events) == 2
        headers = {"Last-Event-ID": str(ended.last_id)}
        chunks: list[bytes] = []
        try:
            async with asyncio.timeout(10), api2.stream("GET", url, headers=headers) as resp:
                async for chunk in resp.aiter_bytes():
                    chunks.append(chunk)
        except TimeoutError:
            pytest.fail(f"the finished stream was held open after resuming: {chunks}")
        assert resp.status_code in (200, 204), resp.status_code
        assert b"data:" not in b"".join(chunks), chunks
