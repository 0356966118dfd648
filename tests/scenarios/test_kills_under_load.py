"""The failure suite: what pushsvc does when things break under load.

An API process SIGKILLed under 100 open streams, a burst of 1,000 submissions, 500 slow
readers of one chatty job, a worker SIGKILLed while it holds several jobs. Each test
brings its own ``pushsvc`` processes on the session's private redis-server, in a
namespace of its own, reads streams with httpx over real sockets, and ends with every
job's terminal event at every subscriber (or a failure saying what is missing).
Redis restarts and outages, a worker killed mid-job, connect/disconnect cycles and bad
bodies are covered by test_redis_outages.py, test_worker.py, test_sse.py and test_api.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import secrets
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psutil
import pytest
from redis.asyncio import Redis

from pushsvc.keys import Keys

from ..conftest import stack_env
from ..procs import Api, Proc, RedisServer
from ..sse import TERMINAL, Event, Stream, assert_gap_free, events, output_of
from .test_redis_outages import collect, describe, logs_on_failure, metric

KEY = "key-a"


# -- helpers ------------------------------------------------------------------------------


def raise_fd_limit(need: int) -> None:
    """Enough descriptors for ``need`` sockets here and in the processes started after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= need, "fd limit too low"


@contextlib.contextmanager
def processes() -> Iterator[list[Proc]]:
    """Processes the test starts; all stopped at the end, their logs shown on failure."""
    procs: list[Proc] = []
    try:
        with logs_on_failure(procs):
            yield procs
    finally:
        for proc in reversed(procs):
            proc.stop()


def http_to(api: Api, connections: int, **transport: Any) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(
        base_url=api.url,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
        transport=httpx.AsyncHTTPTransport(limits=limits, **transport),
    )


async def submit(http: httpx.AsyncClient, type_: str, payload: dict[str, Any]) -> str:
    resp = await http.post("/v1/jobs", json={"type": type_, "payload": payload})
    assert resp.status_code == 202, resp.text
    job_id: str = resp.json()["id"]
    return job_id


async def metrics_of(http: httpx.AsyncClient) -> str:
    resp = await http.get("/metrics")
    assert resp.status_code == 200, resp.text
    return resp.text


async def until_metric(http: httpx.AsyncClient, name: str, value: float, within: float) -> None:
    """Poll another process's gauge until it reads ``value`` (there is no event to await)."""
    seen = None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while (seen := metric(await metrics_of(http), name)) != value:
                await asyncio.sleep(0.05)
    assert seen == value, f"{name} is {seen}, not {value}, after {within} s"


async def settled_stats(http: httpx.AsyncClient, within: float = 10) -> dict[str, Any]:
    """``/v1/stats`` overall, once nothing is queued or running or ``within`` is up (the
    document is another process's, cached for a second: polled)."""
    overall: dict[str, Any] = {}
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while True:
                resp = await http.get("/v1/stats")
                assert resp.status_code == 200, resp.text
                overall = resp.json()["overall"]
                if overall["queue_depth"] == 0 and overall["running"] == 0:
                    break
                await asyncio.sleep(0.2)
    return overall


def assert_drained(overall: dict[str, Any]) -> None:
    assert overall["queue_depth"] == 0 and overall["running"] == 0, (
        f"jobs left in the queue or running after every job ended: {overall}"
    )


async def until_registered(redis: Redis, ns: str, worker: Proc, within: float = 20) -> None:
    """Wait for a worker's first heartbeat (another process: polled)."""
    assert worker.proc is not None
    member = f"{socket.gethostname()}:{worker.proc.pid}"
    async with asyncio.timeout(within):
        while await redis.zscore(Keys(ns).workers, member) is None:
            await asyncio.sleep(0.05)


async def cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def terminal_kinds(evs: list[Event]) -> list[str]:
    return [e.kind for e in evs if e.kind in TERMINAL]


def assert_whole(stream: Stream, job_id: str, end: str, final_seq: int) -> None:
    """assert_gap_free, and more: it starts with a snapshot, skips nothing silently
    (no reset), and ends with the one terminal event, the job's last seq."""
    evs = stream.of(job_id)
    assert evs and evs[0].kind == "snapshot", describe(evs[:3])
    assert not any(e.data.get("reset") for e in evs), describe(evs)
    assert_gap_free(stream, job_id)
    assert terminal_kinds(evs) == [end] and evs[-1].kind == end, describe(evs[-3:])
    assert evs[-1].data["seq"] == final_seq, describe(evs[-3:])


def error_code(event: Event) -> str | None:
    error = event.data.get("error")
    return error.get("code") if isinstance(error, dict) else None


# -- 1. An API process SIGKILLed under 100 open streams -----------------------------------

LONG = {"steps": 80, "interval_ms": 100}  # 8 s, one progress event per step
N_JOBS_1, N_PER_JOB, N_MUX = 4, 50, 50


def stream_plan(jobs: list[str]) -> list[tuple[str, list[str]]]:
    """(url, jobs it names): per-job streams round-robin, multiplexed ones naming 1-4."""
    per_job = [jobs[i % len(jobs)] for i in range(N_PER_JOB)]
    plan = [(f"/v1/jobs/{job_id}/events", [job_id]) for job_id in per_job]
    for i in range(N_MUX):
        named = [jobs[(i + k) % len(jobs)] for k in range(1 + i % len(jobs))]
        plan.append(("/v1/events?" + "&".join(f"job={j}" for j in named), named))
    return plan


async def follow_then_resume(
    first: httpx.AsyncClient, second: httpx.AsyncClient, url: str, live: Callable[[], None]
) -> tuple[Stream, Stream]:
    """Read ``url`` on the first API until it dies, then resume on the second with the
    Last-Event-ID last seen, as EventSource does."""
    before = Stream()
    try:
        async with contextlib.aclosing(events(first, url)) as source:
            async for event in source:
                before.events.append(event)
                if event.kind == "progress" and not any(
                    e.kind == "progress" for e in before.events[:-1]
                ):
                    live()  # the first live event: this stream is open and receiving
        before.closed = True
        return before, Stream()  # ended on its own: the kill was not mid-job
    except httpx.TransportError:
        pass  # the API process died under the stream
    after = await collect(second, url, headers={"Last-Event-ID": str(before.last_id)}, timeout=40)
    return before, after


def check_resumed(
    url: str, jobs: list[str], before: Stream, after: Stream, finals: dict[str, int]
) -> None:
    assert before.events and not before.closed, f"{url} ended before the kill"
    assert not terminal_kinds(before.events), f"{url}: a job ended before the kill"
    assert after.closed, f"{url}: the resumed stream never ended: {describe(after.events)}"
    assert after.events and after.events[0].kind != "snapshot", describe(after.events[:3])
    both = Stream(events=before.events + after.events)
    for job_id in jobs:
        assert_whole(both, job_id, "completed", finals[job_id])
    ids = [e.id for e in both.events]
    if url.startswith("/v1/jobs/"):
        assert ids == [e.data["seq"] for e in both.events], describe(both.events)
    else:  # the opening view shares one tenant seq; after it the cursor only goes up
        rest = [i for i in ids if i != ids[0]]
        assert ids[: len(ids) - len(rest)] == [ids[0]] * (len(ids) - len(rest)), ids
        assert rest == sorted(set(rest)) and rest[0] > ids[0], ids


@pytest.mark.timeout(90)
async def test_api_sigkill_under_100_streams_they_resume_on_another_api(
    redis_server: RedisServer,
) -> None:
    raise_fd_limit(1024)
    env = stack_env(redis_server.url, f"k{secrets.token_hex(3)}")
    plan: list[tuple[str, list[str]]] = []
    tasks: list[asyncio.Task[tuple[Stream, Stream]]] = []
    with processes() as procs:
        procs.append(Proc(["worker"], env).start())
        api1, api2 = Api([], env).start(), Api([], env).start()
        procs += [api1, api2]
        async with http_to(api1, 150) as first, http_to(api2, 150) as second:
            jobs = [await submit(first, "ticker", LONG) for _ in range(N_JOBS_1)]
            plan = stream_plan(jobs)
            live_count, all_live = 0, asyncio.Event()

            def live() -> None:
                nonlocal live_count
                live_count += 1
                if live_count == len(plan):
                    all_live.set()

            try:
                tasks = [
                    asyncio.create_task(follow_then_resume(first, second, url, live))
                    for url, _ in plan
                ]
                started = time.monotonic()
                async with asyncio.timeout(20):
                    await all_live.wait()  # every stream is open on API 1 and receiving
                killed_at = time.time()
                api1.signal(signal.SIGKILL)
                results = await asyncio.gather(*tasks)
                resumed_s = time.monotonic() - started
            finally:
                await cancel_all(tasks)
            finals = {j: (await second.get(f"/v1/jobs/{j}")).json() for j in jobs}
            await until_metric(second, "pushsvc_open_streams", 0, within=10)
            await until_metric(second, "pushsvc_bus_channels", 0, within=10)

    assert {f["status"] for f in finals.values()} == {"completed"}, finals
    assert all(f["finished_at"] > killed_at for f in finals.values())  # the kill was mid-job
    seqs = {j: f["seq"] for j, f in finals.items()}
    for (url, named), (before, after) in zip(plan, results, strict=True):
        check_resumed(url, named, before, after, seqs)
    print(f"\n100 streams killed on API 1, all resumed and ended on API 2 in {resumed_s:.1f} s")


# -- 2. 1,000 submissions in a burst ------------------------------------------------------

BURST, AT_ONCE = 1000, 50
QUICK = {"steps": 1, "interval_ms": 0}


async def burst(http: httpx.AsyncClient) -> list[str]:
    """Submit BURST jobs, AT_ONCE at a time; every answer must be a 202."""
    gate = asyncio.Semaphore(AT_ONCE)

    async def one() -> httpx.Response:
        async with gate:
            return await http.post("/v1/jobs", json={"type": "ticker", "payload": QUICK})

    answers = await asyncio.gather(*(one() for _ in range(BURST)), return_exceptions=True)
    errors = [a for a in answers if not isinstance(a, httpx.Response)]
    assert not errors, f"{len(errors)} submissions raised, e.g. {errors[:3]!r}"
    responses = [a for a in answers if isinstance(a, httpx.Response)]
    codes = Counter(r.status_code for r in responses)
    bad = [r.text for r in responses if r.status_code != 202][:3]
    assert codes == {202: BURST}, (codes, bad)
    return [r.json()["id"] for r in responses]


@pytest.mark.timeout(120)
async def test_burst_of_1000_submissions_all_complete(redis_server: RedisServer) -> None:
    env = stack_env(redis_server.url, f"b{secrets.token_hex(3)}")
    ended: Counter[tuple[str, str]] = Counter()  # (job id, terminal kind) -> events seen
    expected: set[str] = set()
    done, live = asyncio.Event(), asyncio.Event()

    def check() -> None:
        if expected and all((j, "completed") in ended for j in expected):
            done.set()

    async def watch(http: httpx.AsyncClient) -> None:
        """ONE multiplexed stream of all the tenant's jobs, counting terminal events."""
        async with contextlib.aclosing(events(http, "/v1/events")) as source:
            async for event in source:
                live.set()
                if event.kind in TERMINAL:
                    ended[(event.data["job_id"], event.kind)] += 1
                    check()

    with processes() as procs:
        api = Api([], env).start()
        procs.append(api)
        async with http_to(api, AT_ONCE + 10) as http:
            watcher = asyncio.create_task(watch(http))
            watcher.add_done_callback(lambda _: done.set())  # it must not end: fail at once
            try:
                # No worker yet: the first job waits until the stream shows it is live.
                sentinel = await submit(http, "ticker", QUICK)
                async with asyncio.timeout(10):
                    await live.wait()
                procs += [Proc(["worker"], env).start() for _ in range(2)]
                started = time.monotonic()
                ids = await burst(http)
                submitted_s = time.monotonic() - started
                expected.update([*ids, sentinel])
                check()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(60):
                        await done.wait()
                finished_s = time.monotonic() - started
                if watcher.done():
                    watcher.result()  # its error, if it raised
                    pytest.fail("the multiplexed stream of all jobs ended")
                overall = await settled_stats(http)
            finally:
                await cancel_all([watcher])

    assert len(set(ids)) == BURST, "job ids repeat"
    missing = [j for j in expected if (j, "completed") not in ended]
    assert not missing, f"{len(missing)} jobs never completed, e.g. {missing[:3]}"
    odd = {k: n for k, n in ended.items() if n != 1 or k[1] != "completed"}
    assert not odd, f"terminal events repeated or not `completed`: {list(odd.items())[:5]}"
    assert overall["completed"] == BURST + 1 and overall["failed"] == 0, overall
    assert_drained(overall)
    print(f"\n{BURST} submitted in {submitted_s:.1f} s, all completed after {finished_s:.1f} s")


# -- 3. 500 slow readers of one chatty job ------------------------------------------------

READERS = 500
MAX_BYTES = 65536
CHATTY = {"chunks": 256, "size": 4096}  # 1 MiB of text, an output event per chunk
# What the design lets the API hold per lagging stream: its queue (MAX_BYTES, plus the
# frame that overflows it), uvicorn's transport buffer up to its high-water mark (64 KiB)
# plus the one chunk written past it (at most a queue's worth), and the connection and
# its task (measured: under 50 KiB). So 4 x 64 KiB, 125 MiB for 500 streams; keeping
# the job's text per stream instead would be 500 MiB.
PER_STREAM = 4 * 65536


class Sampler:
    """The API's buffered bytes (its /metrics) and RSS (psutil), at their peaks."""

    def __init__(self, http: httpx.AsyncClient, proc: psutil.Process) -> None:
        self.http, self.proc = http, proc
        self.buffered, self.rss = 0.0, 0

    async def run(self) -> None:
        while True:
            text = await metrics_of(self.http)
            self.buffered = max(self.buffered, metric(text, "pushsvc_stream_buffered_bytes"))
            self.rss = max(self.rss, self.proc.memory_info().rss)
            await asyncio.sleep(0.05)  # another process's gauges: polled


async def slow_reader(
    http: httpx.AsyncClient, url: str, paused: Callable[[], None], done: asyncio.Event
) -> Stream:
    """Reads the first event, then nothing until the job is over, then the rest. (Its
    guard against a hang spans the whole test: the test checks memory and text, not how
    fast 500 readers catch up, which a busy CI machine can stretch past a minute.)"""
    out = Stream()
    async with asyncio.timeout(100):
        async with contextlib.aclosing(events(http, url)) as source:
            async for event in source:
                out.events.append(event)
                if len(out.events) == 1:
                    paused()
                    await done.wait()
    out.closed = True
    return out


@pytest.mark.timeout(120)
async def test_500_slow_readers_cost_bounded_memory_and_get_everything(
    redis_server: RedisServer,
) -> None:
    raise_fd_limit(2 * READERS + 256)
    extra = {"stream_max_bytes": str(MAX_BYTES), "publish_rate_hz": "100000"}
    env = stack_env(redis_server.url, f"s{secrets.token_hex(3)}", **extra)
    done, all_paused = asyncio.Event(), asyncio.Event()
    n_paused = 0

    def paused() -> None:
        nonlocal n_paused
        n_paused += 1
        if n_paused == READERS:
            all_paused.set()

    tasks: list[asyncio.Task[Any]] = []
    # A small receive window: the backlog lands in the API's queues, not in the kernel.
    small_window = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)]
    with processes() as procs:
        api = Api([], env).start()
        procs.append(api)
        assert api.proc is not None
        async with (
            http_to(api, 20) as control,
            http_to(api, READERS + 10, socket_options=small_window) as http,
        ):
            sampler = Sampler(control, psutil.Process(api.proc.pid))
            try:
                job = await submit(control, "chatty", CHATTY)  # no worker yet: it waits
                url = f"/v1/jobs/{job}/events"
                base_rss = sampler.proc.memory_info().rss
                tasks = [
                    asyncio.create_task(slow_reader(http, url, paused, done))
                    for _ in range(READERS)
                ]
                async with asyncio.timeout(30):
                    await all_paused.wait()
                open_rss = sampler.proc.memory_info().rss
                tasks.append(asyncio.create_task(sampler.run()))
                started = time.monotonic()
                procs.append(Proc(["worker"], env).start())
                watcher = await collect(control, url, timeout=30)  # a fast reader alongside
                lag_s = time.monotonic() - started
                lagging = (sampler.buffered, sampler.rss)
                sampler.buffered, sampler.rss = 0.0, 0
                text = await metrics_of(control)
                done.set()
                streams = await asyncio.gather(*tasks[:READERS])
                catch_up_s = time.monotonic() - started - lag_s
                catching_up = (sampler.buffered, sampler.rss)
                final = (await control.get(f"/v1/jobs/{job}")).json()
                await until_metric(control, "pushsvc_open_streams", 0, within=10)
                left = metric(await metrics_of(control), "pushsvc_stream_buffered_bytes")
            finally:
                done.set()
                await cancel_all(tasks)

    mib = 1 << 20
    resyncs, merged = metric(text, "pushsvc_stream_resyncs"), metric(text, "pushsvc_frames_merged")
    print(
        f"\n{READERS} slow readers: job over in {lag_s:.1f} s ({resyncs:.0f} resyncs, "
        f"{merged:.0f} merges), all read up {catch_up_s:.1f} s later. API RSS: "
        f"{base_rss / mib:.0f} MiB idle, {open_rss / mib:.0f} with the streams open, peak "
        f"{lagging[1] / mib:.0f} while they lagged, {catching_up[1] / mib:.0f} while they "
        f"caught up. Peak buffered: {lagging[0] / mib:.1f} MiB lagging, "
        f"{catching_up[0] / mib:.1f} catching up"
    )
    assert watcher.closed and watcher.events[-1].kind == "completed", describe(watcher.events)
    assert final["status"] == "completed" and len(final["output"]) == 256 * 4096
    assert resyncs >= READERS, "some readers never fell behind the queue's cap"
    # (The resync count above proves the readers lagged; the queues may be empty at any
    # sampled instant, since an overflow drops them until the stream's resync.)
    assert max(lagging[0], catching_up[0]) <= READERS * MAX_BYTES
    assert lagging[1] - base_rss <= READERS * PER_STREAM, (lagging, base_rss)
    for stream in streams:
        assert stream.closed and stream.events[-1].kind == "completed", describe(stream.events)
        assert terminal_kinds(stream.events) == ["completed"], describe(stream.events)
        assert output_of(stream) == final["output"]  # no text lost, none doubled
    # Every stream is closed: nothing can be waiting in a stream queue any more.
    assert left == 0, f"pushsvc_stream_buffered_bytes stays at {left} with no stream open"


# -- 4. A worker SIGKILLed while it holds several jobs ------------------------------------

HELD = {"steps": 100, "interval_ms": 50}  # 5 s an attempt


@pytest.mark.timeout(90)
async def test_worker_sigkill_holding_several_jobs_the_other_worker_ends_them(
    redis_server: RedisServer, redis: Redis
) -> None:
    ns = f"w{secrets.token_hex(3)}"
    env = stack_env(redis_server.url, ns, lease_s="1")
    tasks: list[asyncio.Task[Stream]] = []
    with processes() as procs:
        api = Api([], env).start()
        doomed = Proc(["worker"], env).start()
        procs += [api, doomed]
        async with http_to(api, 20) as http:
            jobs = {await submit(http, "ticker", HELD): "completed" for _ in range(4)}
            jobs |= {await submit(http, "fragile", HELD): "failed" for _ in range(2)}
            running: dict[str, asyncio.Event] = {j: asyncio.Event() for j in jobs}

            def progressing(s: Stream) -> bool:
                if s.events[-1].kind == "progress":
                    running[s.events[-1].data["job_id"]].set()
                return False  # read on to the end

            mux_url = "/v1/events?" + "&".join(f"job={j}" for j in jobs)
            try:
                tasks = [
                    asyncio.create_task(collect(http, f"/v1/jobs/{j}/events", stop=progressing))
                    for j in jobs
                ]
                tasks.append(asyncio.create_task(collect(http, mux_url)))
                async with asyncio.timeout(20):
                    for event in running.values():
                        await event.wait()  # every job is running on the doomed worker
                rescuer = Proc(["worker"], env).start()
                procs.append(rescuer)
                await until_registered(redis, ns, rescuer)
                killed_at = time.time()
                doomed.signal(signal.SIGKILL)
                streams = await asyncio.gather(*tasks)
                ended_s = time.time() - killed_at
            finally:
                await cancel_all(tasks)
            finals = {j: (await http.get(f"/v1/jobs/{j}")).json() for j in jobs}
            overall = await settled_stats(http, within=5)

    mux = streams[-1]
    assert mux.closed, f"the multiplexed stream never ended: {describe(mux.events)}"
    for (job_id, end), stream in zip(jobs.items(), streams, strict=False):
        final = finals[job_id]
        assert final["status"] == end, final
        assert stream.closed, f"{end} job's stream never ended: {describe(stream.events)}"
        for seen in (stream, mux):
            assert_whole(seen, job_id, end, final["seq"])
        lost = [e for e in stream.events if error_code(e) == "worker_lost"]
        assert lost, describe(stream.events)
        assert lost[0].data["ts"] - killed_at < 5  # the lease (1 s) lapsed and was reaped
        if end == "completed":
            assert final["attempt"] == 2 and lost[0].kind == "status", describe(lost)
        else:
            assert final["error"]["code"] == "worker_lost" and lost[0].kind == "failed"
    print(f"\n{len(jobs)} jobs of a SIGKILLed worker ended {ended_s:.1f} s after the kill")
    assert_drained(overall)  # the dead worker's attempts must not linger as queued
