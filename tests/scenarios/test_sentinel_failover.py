"""Redis Sentinel across real processes: API and worker follow a failover, unrestarted.

Each test brings its own Sentinel-managed primary (:class:`tests.procs.SentinelSet`: a
primary, a replica, three sentinels; after a failover ``primary`` and ``replica`` name
the servers in their new roles), one ``pushsvc worker`` and one ``pushsvc api`` on its
``redis+sentinel://`` URL, and reads streams with httpx over real sockets.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from pushsvc.connections import SentinelPool
from pushsvc.keys import Keys

from ..conftest import TENANTS, stack_env
from ..procs import Api, Proc, SentinelSet
from ..sse import TERMINAL, Event, Stream
from .test_redis_outages import collect, describe, http_for, logs_on_failure, submit

Stack = tuple[SentinelSet, Api, list[Proc], str]


@pytest.fixture
def sentinel_stack() -> Iterator[Stack]:
    sset = SentinelSet().start()
    ns = f"s{secrets.token_hex(3)}"
    # lease_s 5: a two-second outage must not make the worker's own job look abandoned.
    env = stack_env(sset.url, ns, lease_s="5", heartbeat_s="1")
    procs: list[Proc] = []
    try:
        procs.append(Proc(["worker"], env).start())
        api = Api([], env).start()
        procs.append(api)
        yield sset, api, procs, ns
    finally:
        for proc in reversed(procs):
            proc.stop()
        sset.stop()


def terminals(stream: Stream, job_id: str) -> list[Event]:
    return [e for e in stream.of(job_id) if e.kind in TERMINAL]


def until_terminal(job_id: str) -> Callable[[Stream], bool]:
    return lambda s: bool(terminals(s, job_id))


async def run_to_end(http: httpx.AsyncClient, job_id: str) -> Stream:
    """The job's own stream from its snapshot to its end."""
    stream = await collect(http, f"/v1/jobs/{job_id}/events")
    assert stream.closed, f"stream never ended: {describe(stream.events)}"
    return stream


def assert_alive(procs: list[Proc]) -> None:
    for proc in procs:
        assert proc.proc is not None and proc.proc.poll() is None, f"{proc.args} exited"


# -- (a) the URL works ---------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_job_runs_on_a_sentinel_url(sentinel_stack: Stack) -> None:
    sset, api, procs, ns = sentinel_stack
    with logs_on_failure(procs):
        async with http_for(api) as http:
            job_id = await submit(http, {"steps": 3, "interval_ms": 10})
            stream = await run_to_end(http, job_id)
            assert [e.kind for e in terminals(stream, job_id)] == ["completed"]
            assert (await http.get(f"/v1/jobs/{job_id}")).json()["status"] == "completed"
        # Stored on the primary the sentinels name (not some other Redis).
        with redis.Redis(port=sset.primary.port) as primary:
            assert primary.hget(Keys(ns).job(TENANTS["key-a"], job_id), "status") == b"completed"


# -- (b) a planned failover ----------------------------------------------------------


@pytest.mark.timeout(90)
async def test_planned_failover_is_followed_without_restarts(sentinel_stack: Stack) -> None:
    """A stream open across the failover ends with its job's result; the API's pool,
    its pub/sub connection, the worker and arq all use the new primary afterwards."""
    sset, api, procs, ns = sentinel_stack
    with logs_on_failure(procs):
        async with http_for(api) as http:
            job_id = await submit(http, {"steps": 100, "interval_ms": 50})  # about 5 s
            across = Stream()
            running = asyncio.Event()

            def progressing(s: Stream) -> bool:
                if sum(e.kind == "progress" for e in s.events) >= 5:
                    running.set()
                return False

            reader = asyncio.create_task(
                collect(http, f"/v1/jobs/{job_id}/events", stop=progressing, out=across)
            )
            try:
                async with asyncio.timeout(20):
                    await running.wait()
                await asyncio.to_thread(sset.failover)
                done_at = time.time()
                await reader
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

            assert across.closed, f"stream never ended: {describe(across.events)}"
            ends = terminals(across, job_id)
            assert [e.kind for e in ends] == ["completed"], describe(across.events)
            assert ends[0].data["ts"] > done_at, "the job ended before the failover did"

            after = await submit(http, {"steps": 3, "interval_ms": 10})  # API pool + arq
            stream = await run_to_end(http, after)  # worker, and the API's pub/sub
            assert [e.kind for e in terminals(stream, after)] == ["completed"]
            for each in (job_id, after):
                resp = await http.get(f"/v1/jobs/{each}")
                assert resp.status_code == 200 and resp.json()["status"] == "completed"
            assert (await http.get("/readyz")).status_code == 200
        with redis.Redis(port=sset.primary.port) as new_primary:  # the roles swapped
            assert new_primary.info("replication")["role"] == "master"
            assert new_primary.hget(Keys(ns).job(TENANTS["key-a"], after), "status") == b"completed"
        assert_alive(procs)


@pytest.mark.timeout(90)
async def test_job_accepted_after_a_bare_sentinel_failover_is_kept(sentinel_stack: Stack) -> None:
    """Regression: redis-py asks the sentinels only when it opens a connection, so after a
    bare ``SENTINEL FAILOVER`` the API and the worker kept using their connections to the
    old primary, which took writes until Sentinel demoted it about 10 s later: a job
    accepted (202) and run there afterwards vanished (404). A pool now asks again at
    most every ``SentinelPool.recheck_s`` and leaves the old primary."""
    sset, api, procs, ns = sentinel_stack
    with logs_on_failure(procs):
        async with http_for(api) as http:
            before = await submit(http, {"steps": 3, "interval_ms": 10})
            await run_to_end(http, before)  # every process holds connections to the primary
            await asyncio.to_thread(sset.sentinel_failover)
            # The promised bound, not an event: the pools' next checkout asks again.
            await asyncio.sleep(SentinelPool.recheck_s)
            job_id = await submit(http, {"steps": 3, "interval_ms": 10})
            await asyncio.to_thread(sset.wait_demoted)  # what the old primary had is gone
            stream = await run_to_end(http, job_id)
            assert [e.kind for e in terminals(stream, job_id)] == ["completed"]
            resp = await http.get(f"/v1/jobs/{job_id}")
            assert resp.status_code == 200 and resp.json()["status"] == "completed", resp.text
        with redis.Redis(port=sset.primary.port) as new_primary:  # the roles swapped
            status = new_primary.hget(Keys(ns).job(TENANTS["key-a"], job_id), "status")
            assert status == b"completed"
        assert_alive(procs)


# -- (c) a failover that loses writes ------------------------------------------------

COMPARED = ("status", "progress", "output", "result")


def rebuild(events: list[Event]) -> dict[str, Any]:
    """The job as a client rebuilds it: a snapshot replaces it, an ``output`` delta
    appends, other events set the fields they carry (a terminal one: the status too)."""
    state: dict[str, Any] = {"output": ""}
    for event in events:
        if event.kind == "snapshot":
            state = dict(event.data)
        elif event.kind == "output":
            state["output"] += event.data["delta"]
        else:
            state.update(event.data)
            if event.kind in TERMINAL:
                state["status"] = event.kind
    return {key: state.get(key) for key in COMPARED}


class Subscribers:
    """The four readers of one job: per-job, named mux, all-jobs mux, and one that
    disconnects during the outage and resumes with its Last-Event-ID."""

    def __init__(self, http: httpx.AsyncClient, job_id: str) -> None:
        self.http, self.job_id = http, job_id
        self.per_job, self.named, self.all_jobs = Stream(), Stream(), Stream()
        self.before, self.resumed = Stream(), Stream()  # the resuming client's two reads
        self.barrier: str | None = None  # a later job whose end closes the all-jobs read
        self.barrier_submitted = asyncio.Event()
        self.progress_seen = asyncio.Event()
        self.wanted_progress = 5
        self.tasks: list[asyncio.Task[Stream]] = []  # per-job, named, all-jobs
        self.first: asyncio.Task[Stream] | None = None  # the resuming client's first read

    def _count(self, s: Stream) -> bool:
        if sum(e.kind == "progress" for e in s.of(self.job_id)) >= self.wanted_progress:
            self.progress_seen.set()
        return False

    def _barrier_done(self, s: Stream) -> bool:
        return self.barrier is not None and bool(terminals(s, self.barrier))

    def start(self) -> list[asyncio.Task[Stream]]:
        job = self.job_id
        reads = [
            collect(self.http, f"/v1/jobs/{job}/events", stop=self._count, out=self.per_job),
            collect(self.http, f"/v1/events?job={job}", out=self.named),
            collect(self.http, "/v1/events", stop=self._barrier_done, out=self.all_jobs),
        ]
        self.tasks = [asyncio.create_task(read) for read in reads]
        self.first = asyncio.create_task(
            collect(self.http, f"/v1/jobs/{job}/events", out=self.before, timeout=60)
        )
        return self.tasks

    async def progressed(self, more: int) -> None:
        """Wait until the per-job reader has seen ``more`` progress events beyond now."""
        self.wanted_progress = sum(e.kind == "progress" for e in self.per_job.events) + more
        self.progress_seen.clear()
        self._count(self.per_job)
        async with asyncio.timeout(20):
            await self.progress_seen.wait()

    async def disconnect_first(self) -> None:
        assert self.first is not None
        self.first.cancel()
        await asyncio.gather(self.first, return_exceptions=True)


def check_subscriber(name: str, events: list[Event], final: dict[str, Any]) -> None:
    ends = [e for e in events if e.kind in TERMINAL]
    assert len(ends) == 1, f"{name}: {len(ends)} terminal events: {describe(events)}"
    want = {key: final[key] for key in COMPARED}
    assert rebuild(events) == want, f"{name}: rebuilt state differs: {describe(events)}"


@pytest.mark.timeout(120)
async def test_failover_losing_writes_mid_job(sentinel_stack: Stack) -> None:
    """The replica misses the last writes of a running job, then the primary dies and
    the replica takes over: every subscriber still ends with exactly one terminal event
    and the job exactly as stored, and the streams that end, end."""
    sset, api, procs, _ = sentinel_stack
    with logs_on_failure(procs):
        async with http_for(api) as http:
            # About 6 s: it runs on through the outage (about 2 s) and after it.
            job_id = await submit(http, {"steps": 120, "interval_ms": 50})
            subs = Subscribers(http, job_id)
            tasks = subs.start()
            try:
                await subs.progressed(5)
                await asyncio.to_thread(sset.pause_replication)
                replicated = subs.per_job.events[-1].data["seq"]
                await subs.progressed(5)  # published, delivered, and never replicated
                lost = await asyncio.to_thread(sset.kill_primary)
                await subs.disconnect_first()  # gone during the outage
                await asyncio.to_thread(sset.wait_promoted)
                resume = {"Last-Event-ID": subs.before.resume_id}
                subs.resumed = await collect(http, f"/v1/jobs/{job_id}/events", headers=resume)
                await asyncio.gather(*tasks[:2])  # per-job and named: they end by themselves
                subs.barrier = await submit(http, {"steps": 1, "interval_ms": 0})
                await tasks[2]
            finally:
                everything = [*tasks, *([subs.first] if subs.first else [])]
                for task in everything:
                    task.cancel()
                await asyncio.gather(*everything, return_exceptions=True)

            assert lost > 0, "the failover lost no writes: nothing was tested"
            # The resuming client's Last-Event-ID names an event the new primary never had.
            assert subs.before.events[-1].data["seq"] > replicated, describe(subs.before.events)
            resp = await http.get(f"/v1/jobs/{job_id}")
            assert resp.status_code == 200, resp.text
            final = resp.json()
            print(f"lost {lost} bytes; final snapshot: {final}")
            for name, stream in (("per-job", subs.per_job), ("named mux", subs.named)):
                assert stream.closed, f"{name} never ended: {describe(stream.events)}"
            assert subs.resumed.closed, f"resumed never ended: {describe(subs.resumed.events)}"
            check_subscriber("per-job", subs.per_job.events, final)
            check_subscriber("named mux", subs.named.of(job_id), final)
            check_subscriber("all-jobs mux", subs.all_jobs.of(job_id), final)
            check_subscriber("resumed", subs.before.events + subs.resumed.events, final)
        assert_alive(procs)


# -- (d) the set itself: failovers back and forth --------------------------------------


@pytest.mark.timeout(120)
def test_the_set_fails_over_back_and_forth_losing_what_the_replica_missed() -> None:
    """The chaos bench's ``sentinel-failover``: each failover, planned or of a killed
    primary, loses exactly the writes the replica was held from, and leaves the old
    primary following the new one, so the set fails over again, and back."""
    sset = SentinelSet().start()
    try:
        for round_, kill in enumerate((False, True, False)):
            old, new = sset.primary, sset.replica
            with redis.Redis(port=old.port) as client:
                client.set(f"kept{round_}", 1)
                sset.hold_replication()
                client.set(f"lost{round_}", 1)
            if kill:
                assert sset.kill_primary() > 0
                sset.wait_promoted()
                sset.rejoin()
            else:
                assert sset.failover_losing_writes()[1] > 0
            assert sset.wait_healthy() is False, "the sentinels failed over on their own"
            assert sset.primary is new and sset.replica is old
            assert (new.role(), old.role()) == ("master", "slave")
            for node in (new, old):
                with redis.Redis(port=node.port) as client:
                    assert client.get(f"kept{round_}") == b"1", node.name
                    assert client.get(f"lost{round_}") is None, node.name
        assert sset.exited() == []
    finally:
        sset.stop()
