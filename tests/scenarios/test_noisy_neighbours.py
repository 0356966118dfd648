"""Noisy neighbours (the failure suite's issue): one tenant's heavy streams and reads must
not starve another tenant's requests on the same API process.

Regression: 300 readers that never read, on one job with 10 MB of output, took the API
process's 2 pooled Redis connections with their snapshot reads: pool timeouts answered
other tenants' requests with 503s, and streams whose response had started died with
"Caught handled exception, but response already started". So did a herd reopening a
running job's stream at once, concurrent tenant-log replays, and type-filtered listings
that read every job whole. Here all of it runs at once, at a size this machine runs in
well under a minute, and the test asserts behaviour: no 5xx, no stream aborted, every
stream that reads gets its terminal event, the other tenant's polls all answered. The
other tenant's latency under this load is a figure of ``pushsvc bench neighbours``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from ..conftest import stack_env
from ..procs import Api, Proc, RedisServer
from ..sse import Event, Stream, assert_gap_free, assert_ids_cover, output_of
from .test_kills_under_load import (
    cancel_all,
    http_to,
    metrics_of,
    processes,
    raise_fd_limit,
    until_metric,
)
from .test_redis_outages import collect, describe, metric

NON_READERS, LATE_READERS, HERD, REPLAYS, LISTERS = 200, 4, 150, 10, 6
LISTER_JOBS = 300
NOISY = {"output_kib": 10 * 1024, "ticks": 3000, "tick_ms": 100}  # 10 MiB, then runs on
REPLAYED = {"output_kib": 2 * 1024}  # the lister's finished job: its log is replayed
SMALL_WINDOW = 16384  # a reader's receive window: the backlog stays in the API
BAD_LOG_LINES = ("Traceback", "response already started", "No connection available")


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def submit(http: httpx.AsyncClient, key: str, type_: str, payload: dict[str, Any]) -> str:
    body = {"type": type_, "payload": payload}
    resp = await http.post("/v1/jobs", json=body, headers=auth(key))
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


async def get_job(http: httpx.AsyncClient, key: str, job_id: str) -> dict[str, Any]:
    resp = await http.get(f"/v1/jobs/{job_id}", headers=auth(key))
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def settled(http: httpx.AsyncClient, noisy: str, replayed: str) -> None:
    """Until the noisy job has written all its output and everything else has ended
    (other processes' state: polled)."""
    async with asyncio.timeout(60):
        while True:
            job = await get_job(http, "key-a", noisy)
            done = (await get_job(http, "key-c", replayed))["status"] == "completed"
            idle = metric(await metrics_of(http), "pushsvc_queue_depth") == 0
            if done and idle and job["stage"] == "ticking":
                return
            await asyncio.sleep(0.2)


async def non_reader(api: Api, path: str) -> tuple[int, asyncio.StreamWriter]:
    """Asks for a stream through a small receive window; reads the status line only."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_WINDOW)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", api.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-a\r\n\r\n".encode())
    status = await asyncio.wait_for(reader.readline(), 30)
    return int(status.split()[1]), writer


async def non_readers(api: Api, path: str) -> list[tuple[int, asyncio.StreamWriter]]:
    """NON_READERS of them, one after another while the job runs on: each finds the
    snapshot the ones before it are still sending."""
    return [await non_reader(api, path) for _ in range(NON_READERS)]


async def late_reader(
    http: httpx.AsyncClient, path: str, opened: Callable[[], None], done: asyncio.Event
) -> Stream:
    """Opens the stream, reads nothing until ``done``, then reads it to its end."""
    out = Stream()
    async with asyncio.timeout(90), aconnect_sse(http, "GET", path) as source:
        assert source.response.status_code == 200
        opened()
        await done.wait()
        async for sse in source.aiter_sse():
            if sse.event == "queue":
                continue  # volatile (no id): not part of the history checked
            if sse.event == "message" and sse.data == "":
                continue  # httpx-sse's rendering of a heartbeat
            seq, _, epoch = sse.id.partition(".")
            out.events.append(Event(int(seq), sse.event, json.loads(sse.data), epoch))
    out.closed = True
    return out


class Neighbour:
    """Another tenant polling its own job's status all along."""

    def __init__(self) -> None:
        self.answers: Counter[int] = Counter()
        self.latencies: list[float] = []

    async def poll(self, http: httpx.AsyncClient, job_id: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            resp = await http.get(f"/v1/jobs/{job_id}", headers=auth("key-b"))
            self.latencies.append(time.perf_counter() - started)
            self.answers[resp.status_code] += 1
            await asyncio.sleep(0.02)

    def figures(self) -> str:
        ms = sorted(1000 * s for s in self.latencies)
        p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
        return f"p50 {ms[len(ms) // 2]:.0f} ms, p99 {p99:.0f} ms, max {ms[-1]:.0f} ms"


class Live:
    """Counts streams that received their first event; set once all ``n`` have."""

    def __init__(self, n: int) -> None:
        self.n, self.seen, self.all = n, 0, asyncio.Event()

    def hook(self, stream: Stream) -> bool:
        if len(stream.events) == 1:
            self.opened()
        return False  # read on to the end

    def opened(self) -> None:
        self.seen += 1
        if self.seen == self.n:
            self.all.set()


async def listings(http: httpx.AsyncClient) -> list[httpx.Response]:
    """LISTERS clients, each listing a type no job has three times over."""

    async def lister() -> list[httpx.Response]:
        return [
            await http.get("/v1/jobs", params={"type": "nonexistent"}, headers=auth("key-c"))
            for _ in range(3)
        ]

    rounds = await asyncio.gather(*(lister() for _ in range(LISTERS)))
    return [resp for answers in rounds for resp in answers]


@dataclass
class Jobs:
    own: str  # the neighbour's
    noisy: str  # the large output, running
    replayed: str  # the lister's finished large job, whose tenant log is replayed
    resume: str  # a Last-Event-ID a few events back on the noisy job


async def prepare(http: httpx.AsyncClient) -> Jobs:
    own = await submit(http, "key-b", "ticker", {"steps": 1, "interval_ms": 0})
    gate = asyncio.Semaphore(20)

    async def quick() -> str:
        async with gate:
            return await submit(http, "key-c", "ticker", {"steps": 1, "interval_ms": 0})

    await asyncio.gather(*(quick() for _ in range(LISTER_JOBS)))
    replayed = await submit(http, "key-c", "bulky", REPLAYED)
    noisy = await submit(http, "key-a", "bulky", NOISY)
    await settled(http, noisy, replayed)
    etag = (await http.get(f"/v1/jobs/{noisy}", headers=auth("key-a"))).headers["etag"]
    seq, _, epoch = etag.strip('"').partition(".")
    return Jobs(own, noisy, replayed, f"{int(seq) - 3}.{epoch}")


@dataclass
class Seen:
    """What every attacker and the neighbour got."""

    opened: list[tuple[int, Any]] = field(default_factory=list)  # non-readers
    listed: list[httpx.Response] = field(default_factory=list)
    replays: list[Stream] = field(default_factory=list)
    herd: list[Stream] = field(default_factory=list)
    late: list[Stream] = field(default_factory=list)
    attack_s: float = 0.0


async def attack(
    api: Api, http: httpx.AsyncClient, streams: httpx.AsyncClient, jobs: Jobs, seen: Seen
) -> None:
    """Everything at once; once the herd and the late readers are live, the noisy job
    is cancelled: every stream that reads ends with its terminal event."""
    path, done = f"/v1/jobs/{jobs.noisy}/events", asyncio.Event()
    herd_live, late_open = Live(HERD), Live(LATE_READERS)
    resume = {**auth("key-a"), "Last-Event-ID": jobs.resume}
    replay = {**auth("key-c"), "Last-Event-ID": "0"}
    started = time.monotonic()
    opening = asyncio.create_task(non_readers(api, path))
    late = [
        asyncio.create_task(late_reader(streams, path, late_open.opened, done))
        for _ in range(LATE_READERS)
    ]
    herd = [
        asyncio.create_task(collect(streams, path, headers=resume, stop=herd_live.hook, timeout=90))
        for _ in range(HERD)
    ]
    url = f"/v1/events?job={jobs.replayed}"
    replays = asyncio.gather(
        *(collect(streams, url, headers=replay, timeout=90) for _ in range(REPLAYS))
    )
    try:
        seen.listed = await listings(http)
        seen.opened = await opening
        seen.replays = await replays
        async with asyncio.timeout(60):
            await herd_live.all.wait()
            await late_open.all.wait()
        seen.attack_s = time.monotonic() - started
        cancel = await http.delete(f"/v1/jobs/{jobs.noisy}", headers=auth("key-a"))
        assert cancel.status_code == 202, cancel.text
        done.set()
        seen.herd = await asyncio.gather(*herd)
        seen.late = await asyncio.gather(*late)
    finally:
        done.set()
        await cancel_all([*herd, *late])
        for _, writer in seen.opened:
            writer.close()


@pytest.mark.timeout(120)
async def test_noisy_streams_and_reads_leave_another_tenant_served(
    redis_server: RedisServer,
) -> None:
    raise_fd_limit(2 * (NON_READERS + LATE_READERS + HERD + REPLAYS + 50) + 256)
    modules = "tests.jobtypes,pushsvc.tools.bench.jobtypes"  # bulky: a large output, then running
    env = stack_env(redis_server.url, f"n{secrets.token_hex(3)}", job_modules=modules)
    neighbour, seen, stop = Neighbour(), Seen(), asyncio.Event()
    with processes() as procs:
        api = Api([], env).start()
        procs += [api, Proc(["worker"], env).start()]
        async with http_to(api, 50) as http, http_to(api, HERD + REPLAYS + 10) as streams:
            jobs = await prepare(http)
            polls = [asyncio.create_task(neighbour.poll(http, jobs.own, stop)) for _ in range(2)]
            try:
                await attack(api, http, streams, jobs, seen)
            finally:
                stop.set()
                await asyncio.gather(*polls)
            figures = await metrics_of(http)
            reads = metric(figures, "pushsvc_snapshot_reads")
            merged = metric(figures, "pushsvc_frames_merged")
            final = await get_job(http, "key-a", jobs.noisy)
            replay_final = await get_job(http, "key-c", jobs.replayed)
            # The job's log from the herd's position: what each herd stream stood for.
            resume = {**auth("key-a"), "Last-Event-ID": jobs.resume}
            logged = await collect(streams, f"/v1/jobs/{jobs.noisy}/events", headers=resume)
            await until_metric(http, "pushsvc_open_streams", 0, within=20)
        api_log = api.output()

    print(
        f"\nAttack ({NON_READERS} non-readers, a herd of {HERD}, {REPLAYS} replays, "
        f"{LISTERS * 3} listings) live in {seen.attack_s:.1f} s; the neighbour's "
        f"{sum(neighbour.answers.values())} polls: {neighbour.figures()} (the load "
        "generator shares this process: `pushsvc bench neighbours` measures latency)"
    )
    assert Counter(status for status, _ in seen.opened) == {200: NON_READERS}
    # One copy of the 10 MiB snapshot for all of them, not one each (they came one by one)
    assert reads < 10, f"{reads:.0f} snapshot reads for {NON_READERS} slow readers"
    assert neighbour.answers and set(neighbour.answers) == {200}, neighbour.answers
    assert {r.status_code for r in seen.listed} == {200}, [r.text[:200] for r in seen.listed]
    assert all(r.json()["jobs"] == [] for r in seen.listed)
    for line in BAD_LOG_LINES:
        assert line not in api_log, f"the API log has {line!r}"
    assert final["status"] == "cancelled"
    first, skipped = int(jobs.resume.partition(".")[0]) + 1, 0
    assert [e.id for e in logged.events] == list(range(first, final["seq"] + 1))
    kinds = {e.id: e.kind for e in logged.events}
    for stream in seen.herd:  # each resumed where it was, on to the terminal event
        assert stream.closed, describe(stream.events[-3:])
        skipped += assert_ids_cover(stream.events, first, final["seq"], kinds)
        assert stream.events[-1].kind == "cancelled"
    assert skipped <= merged, f"{skipped} events merged away, {merged:.0f} merges counted"
    for stream in seen.late:  # the whole 10 MiB snapshot, intact, after the wait
        assert stream.closed and stream.events[0].kind == "snapshot"
        assert stream.events[-1].kind == "cancelled", describe(stream.events[-3:])
        assert output_of(stream) == final["output"] and len(final["output"]) == 10 << 20
    for stream in seen.replays:  # the whole tenant log, a page at a time
        assert stream.closed and stream.events[-1].kind == "completed"
        assert_gap_free(stream, jobs.replayed)
        assert output_of(stream) == replay_final["output"]
