"""History that Redis loses: positions carry epochs, workers repair, lost jobs end.

Each test runs real processes (a private redis-server, ``pushsvc api``, ``pushsvc
worker``, the offline model) and watches a streaming ``generate`` job with every kind of
subscriber: a per-job stream, a named multiplexed stream, the tenant's all-jobs stream,
and a client that disconnects and resumes with the Last-Event-ID it was given. Each
must rebuild exactly the final stored job (a snapshot replaces, a delta appends), see
one terminal event, and not hang; the final text must be the model's.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from pushsvc.keys import Keys

from ..conftest import model_answer, stack_env
from ..procs import Api, Proc, RedisServer
from ..sse import TERMINAL, Event, Stream, settled
from .test_redis_outages import collect, describe, http_for, logs_on_failure

PROMPT = "[[tokens:150]] [[rate:25]] tides in a lighthouse town"  # about 6 s of text
LONG_PROMPT = "[[tokens:400]] [[rate:25]] a long walk along the harbour"  # about 16 s


class SnapshotRedis(RedisServer):
    """A private redis-server that keeps only what ``save`` wrote: killed and started
    again, it comes back with that older snapshot (or empty, once wiped)."""

    def save(self) -> None:
        with redis.Redis(port=self.port) as client:
            client.save()

    def crash(self, *, wipe: bool = False) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None
        if wipe:
            Path(self.dir, "dump.rdb").unlink(missing_ok=True)


@pytest.fixture
def faulty(model_url: str) -> Iterator[tuple[SnapshotRedis, dict[str, str], list[Proc]]]:
    server = SnapshotRedis().start()
    env = stack_env(
        server.url,
        f"e{secrets.token_hex(3)}",
        llm_base_url=model_url,
        llm_api_key="offline",
        llm_model="fake-1",
        lease_s="3",
        heartbeat_s="1",
        state_lost_grace_s="3",
        worker_concurrency="1",  # a second job waits queued
        publish_rate_hz="20",
    )
    procs: list[Proc] = []
    try:
        yield server, env, procs
    finally:
        for proc in reversed(procs):
            proc.stop()
        server.stop()


def job_events(stream: Stream, job_id: str) -> list[Event]:
    return stream.of(job_id)


def outputs(stream: Stream, job_id: str) -> int:
    return sum(e.kind == "output" for e in stream.of(job_id))


def rebuild(events: list[Event]) -> dict[str, Any]:
    """The job as a generic SSE client builds it: snapshots replace, deltas append."""
    job: dict[str, Any] = {}
    for ev in events:
        if ev.kind == "snapshot":
            job = dict(ev.data)
        elif ev.kind == "output":
            job["output"] = job.get("output", "") + ev.data["delta"]
        elif ev.kind in ("status", "progress"):
            job.update({k: v for k, v in ev.data.items() if k not in ("job_id", "seq", "ts")})
        elif ev.kind in TERMINAL:
            job["status"] = ev.kind
    return job


def assert_converged(name: str, events: list[Event], final: dict[str, Any]) -> None:
    assert events, f"{name}: no events"
    ends = [e for e in events if e.kind in TERMINAL]
    assert len(ends) == 1, f"{name}: terminal events {describe(ends)} in {describe(events)}"
    assert events[-1].kind in TERMINAL, f"{name}: {describe(events[-3:])}"
    built = rebuild(events)
    assert built["status"] == final["status"], (name, describe(events))
    assert built["output"] == final["output"], (name, built["output"], final["output"])


class Changes:
    """Wakes a test whenever any of its streams received something."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def stop(self, stop: Callable[[Stream], bool] | None) -> Callable[[Stream], bool]:
        def seen(s: Stream) -> bool:
            self._changed.set()
            return stop(s) if stop else False

        return seen

    async def until(self, check: Callable[[], bool], timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                self._changed.clear()
                await self._changed.wait()


class Watchers:
    """The four subscribers of one job; ``until`` awaits what they have received."""

    def __init__(
        self, http: httpx.AsyncClient, job_id: str, everything: Stream, changes: Changes
    ) -> None:
        self.http, self.job_id, self.everything = http, job_id, everything
        self.per_job, self.named, self.first, self.resumed = Stream(), Stream(), Stream(), Stream()
        self.changes = changes
        self.until = changes.until
        self.tasks = [
            self._read(f"/v1/jobs/{job_id}/events", self.per_job),
            self._read(f"/v1/events?job={job_id}", self.named),
            self._read(f"/v1/jobs/{job_id}/events", self.first, lambda s: outputs(s, job_id) >= 3),
        ]

    def _read(
        self, url: str, out: Stream, stop: Callable[[Stream], bool] | None = None, **kw: Any
    ) -> asyncio.Task[Stream]:
        seen = self.changes.stop(stop)
        return asyncio.create_task(collect(self.http, url, out=out, stop=seen, timeout=60, **kw))

    def resume(self) -> None:
        """The client that left comes back with the id it last received."""
        headers = {"Last-Event-ID": self.first.resume_id}
        url = f"/v1/jobs/{self.job_id}/events"
        self.tasks.append(self._read(url, self.resumed, headers=headers))

    async def finish(self) -> None:
        await asyncio.gather(*self.tasks)

    def check(self, final: dict[str, Any]) -> None:
        for name, stream in (("per-job", self.per_job), ("named", self.named)):
            assert stream.closed, f"{name} stream hung: {describe(stream.events[-5:])}"
            assert_converged(name, stream.events, final)
        assert self.resumed.closed, f"resumed stream hung: {describe(self.resumed.events)}"
        assert_converged("resumed", self.first.events + self.resumed.events, final)
        assert_converged("all-jobs", self.everything.of(self.job_id), final)


@contextlib.asynccontextmanager
async def all_jobs_stream(
    http: httpx.AsyncClient, done: Callable[[Stream], bool], changes: Changes
) -> AsyncIterator[tuple[Stream, asyncio.Task[Stream]]]:
    """The tenant's all-jobs stream, open before anything is submitted."""
    stream = Stream()
    stop = changes.stop(done)
    task = asyncio.create_task(collect(http, "/v1/events", out=stream, stop=stop, timeout=90))
    try:
        await settled(http, 1)  # the API holds it open: nothing it sends can be missed
        yield stream, task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def submit_generate(http: httpx.AsyncClient, prompt: str) -> str:
    resp = await http.post("/v1/jobs", json={"type": "generate", "payload": {"prompt": prompt}})
    assert resp.status_code == 202, resp.text
    job_id: str = resp.json()["id"]
    return job_id


def ended(stream: Stream, jobs: set[str]) -> bool:
    return bool(jobs) and all(any(e.kind in TERMINAL for e in stream.of(j)) for j in jobs)


async def restart_mid_stream(
    faulty: tuple[SnapshotRedis, dict[str, str], list[Proc]], model_url: str, *, wipe: bool
) -> None:
    server, env, procs = faulty
    procs.append(Proc(["worker"], env).start())
    api = Api([], env).start()
    procs.append(api)
    expected = await model_answer(model_url, PROMPT)
    watched: set[str] = set()
    changes = Changes()
    with logs_on_failure(procs):
        async with (
            http_for(api) as http,
            all_jobs_stream(http, lambda s: ended(s, watched), changes) as (everything, all_task),
        ):
            job_id = await submit_generate(http, PROMPT)
            watched.add(job_id)
            w = Watchers(http, job_id, everything, changes)
            await w.until(lambda: outputs(w.per_job, job_id) >= 4)
            queued = await submit_generate(http, "[[tokens:5]] waits its turn")
            lost = Stream()
            lost_task = asyncio.create_task(
                collect(http, f"/v1/jobs/{queued}/events", out=lost, timeout=60)
            )
            await asyncio.to_thread(server.save)
            await w.until(lambda: outputs(w.per_job, job_id) >= 12)  # text the snapshot lacks
            server.crash(wipe=wipe)
            await asyncio.to_thread(server.start)
            back_at = time.time()
            w.resume()
            after = await submit_generate(http, "[[tokens:5]] written after the fault")
            watched.add(after)
            await w.finish()
            await lost_task
            await asyncio.wait_for(all_task, 60)

            final = (await http.get(f"/v1/jobs/{job_id}")).json()
            assert final["status"] == "completed", final
            assert final["output"] == expected and final["result"]["text"] == expected
            w.check(final)
            assert any(e.data.get("reset") for e in w.per_job.events), "no history was lost?"
            assert w.per_job.events[-1].data["ts"] > back_at  # the job outlived the fault
            later = (await http.get(f"/v1/jobs/{after}")).json()
            assert_converged("all-jobs, a job created after", everything.of(after), later)
            await check_queued(http, queued, lost, wipe)


async def check_queued(http: httpx.AsyncClient, job_id: str, stream: Stream, wiped: bool) -> None:
    """A job queued at the fault: lost with an empty Redis (its streams say so, and end),
    else it runs from the snapshot that held it."""
    assert stream.closed, f"the queued job's stream hung: {describe(stream.events)}"
    resp = await http.get(f"/v1/jobs/{job_id}")
    if wiped:
        assert resp.status_code == 404
        assert stream.events[-1].kind == "failed", describe(stream.events)
        assert stream.events[-1].data["error"]["code"] == "state_lost"
    else:
        assert resp.status_code == 200
        assert_converged("queued job", stream.events, resp.json())


@pytest.mark.timeout(120)
async def test_redis_restarted_from_an_older_snapshot_mid_stream(
    faulty: tuple[SnapshotRedis, dict[str, str], list[Proc]], model_url: str
) -> None:
    """Was: the stored output lost the text between the snapshot and the crash, and live
    events whose rewound seq a stream had sent were dropped as "already seen"."""
    await restart_mid_stream(faulty, model_url, wipe=False)


@pytest.mark.timeout(120)
async def test_redis_restarted_empty_mid_stream(
    faulty: tuple[SnapshotRedis, dict[str, str], list[Proc]], model_url: str
) -> None:
    """Was: per-job streams ended without a terminal event, a named stream hung, and the
    all-jobs stream never saw a job created after the restart."""
    await restart_mid_stream(faulty, model_url, wipe=True)


@pytest.mark.timeout(90)
async def test_idle_tenant_whose_sequence_expired_still_gets_new_jobs(
    redis_server: RedisServer,
) -> None:
    """Was: once the tenant sequence expired, open all-jobs streams got no events of the
    tenant's next jobs (their tenant seqs started again below the stream's cursor)."""
    env = stack_env(redis_server.url, f"e{secrets.token_hex(3)}", job_ttl_s="2")
    procs = [Proc(["worker"], env).start()]
    api = Api([], env).start()
    procs.append(api)
    jobs: set[str] = set()
    changes = Changes()
    try:
        with logs_on_failure(procs):
            async with (
                http_for(api) as http,
                all_jobs_stream(http, lambda s: ended(s, jobs), changes) as (everything, task),
            ):
                first = await submit_job(http, set())
                await changes.until(lambda: ended(everything, {first}))
                await gone(redis_server, env["PUSHSVC_NAMESPACE"])
                second = await submit_job(http, jobs)  # the stream ends once this one has
                await asyncio.wait_for(task, 30)
                final = (await http.get(f"/v1/jobs/{second}")).json()
                assert_converged("after expiry", everything.of(second), final)
    finally:
        for proc in reversed(procs):
            proc.stop()


async def submit_job(http: httpx.AsyncClient, jobs: set[str]) -> str:
    resp = await http.post(
        "/v1/jobs", json={"type": "ticker", "payload": {"steps": 3, "interval_ms": 10}}
    )
    assert resp.status_code == 202, resp.text
    jobs.add(resp.json()["id"])
    return str(resp.json()["id"])


async def gone(server: RedisServer, ns: str) -> None:
    """Wait until Redis expired the tenant's position (Redis's clock, not an event)."""
    async with asyncio.timeout(20):
        with redis.Redis(port=server.port) as client:
            while client.exists(Keys(ns).tenant_position("tenant-a")):
                await asyncio.sleep(0.1)


@pytest.mark.timeout(120)
async def test_a_superseded_attempt_stops_and_closes_its_model_call(
    faulty: tuple[SnapshotRedis, dict[str, str], list[Proc]], model_url: str
) -> None:
    """Was: a worker paused past its lease kept running its old attempt after it resumed
    (its writes refused), and went on calling the model."""
    server, env, procs = faulty
    paused = Proc(["worker"], env).start()
    procs.append(paused)
    api = Api([], env).start()
    procs.append(api)
    expected = await model_answer(model_url, LONG_PROMPT)
    with logs_on_failure(procs):
        changes = Changes()
        async with (
            http_for(api) as http,
            all_jobs_stream(http, lambda s: False, changes) as (everything, _),
        ):
            job_id = await submit_generate(http, LONG_PROMPT)
            w = Watchers(http, job_id, everything, changes)
            await w.until(lambda: outputs(w.per_job, job_id) >= 3)
            before = await fake_stats(model_url)
            paused.signal(signal.SIGSTOP)
            procs.append(Proc(["worker"], env).start())  # reaps the lapsed lease, runs it again
            await w.until(lambda: any(e.data.get("attempt") == 2 for e in w.per_job.events))
            paused.signal(signal.SIGCONT)
            w.resume()
            await w.finish()
            final = (await http.get(f"/v1/jobs/{job_id}")).json()
            assert final["status"] == "completed" and final["attempt"] == 2, final
            assert final["output"] == expected
            await w.until(lambda: ended(everything, {job_id}))
            w.check(final)
            async with asyncio.timeout(20):  # the paused worker closes its model stream
                while (await fake_stats(model_url))["disconnects"] <= before["disconnects"]:
                    await asyncio.sleep(0.1)
            assert "attempt superseded" in paused.output()


async def fake_stats(model_url: str) -> dict[str, int]:
    async with httpx.AsyncClient() as http:
        stats: dict[str, int] = (await http.get(model_url[:-3] + "/_fake/stats")).json()
        return stats


@pytest.mark.timeout(120)
async def test_a_job_a_named_stream_saw_end_stays_ended_when_redis_forgets_it(
    faulty: tuple[SnapshotRedis, dict[str, str], list[Proc]], model_url: str
) -> None:
    """Was (chaos run): a named stream that had sent a job's ``completed`` and still
    waited for another job sent ``failed``/``state_lost`` for the first one once an
    empty Redis forgot it: two terminal events of one job."""
    server, env, procs = faulty
    procs.append(Proc(["worker"], env).start())
    api = Api([], env).start()
    procs.append(api)
    expected = await model_answer(model_url, PROMPT)
    with logs_on_failure(procs):
        async with http_for(api) as http:
            done = await submit_job(http, set())
            running = await submit_generate(http, PROMPT)
            changes = Changes()
            named = Stream()
            task = asyncio.create_task(
                collect(
                    http,
                    f"/v1/events?job={done}&job={running}",
                    out=named,
                    stop=changes.stop(None),
                    timeout=60,
                )
            )
            await changes.until(lambda: ended(named, {done}) and outputs(named, running) >= 3)
            server.crash(wipe=True)
            await asyncio.to_thread(server.start)
            await task
            assert named.closed, f"named stream hung: {describe(named.events[-5:])}"
            assert [e.kind for e in named.of(done) if e.kind in TERMINAL] == ["completed"]
            final = (await http.get(f"/v1/jobs/{running}")).json()
            assert final["output"] == expected
            assert_converged("named, the running job", named.of(running), final)
            assert (await http.get(f"/v1/jobs/{done}")).status_code == 404


@pytest.mark.timeout(120)
async def test_a_client_that_keeps_reconnecting_learns_its_lost_job_is_gone(
    faulty: tuple[SnapshotRedis, dict[str, str], list[Proc]], model_url: str
) -> None:
    """Was (chaos run): a client resuming a lost queued job every 0.5-3 s never heard of
    it again: each connection waited a whole grace of its own before ``state_lost``.
    The grace now runs from the store's recovery, the same for every connection."""
    server, env, procs = faulty
    procs.append(Proc(["worker"], env).start())
    api = Api([], env).start()
    procs.append(api)
    with logs_on_failure(procs):
        async with http_for(api) as http:
            await submit_generate(http, LONG_PROMPT)  # keeps the one worker slot busy
            queued = await submit_job(http, set())
            url = f"/v1/jobs/{queued}/events"
            first = await collect(http, url, stop=lambda s: bool(s.events))
            assert first.events[0].data["status"] == "queued"
            server.crash(wipe=True)
            await asyncio.to_thread(server.start)
            seen: list[Event] = []
            last_id = first.resume_id
            async with asyncio.timeout(30):
                while not any(e.kind in TERMINAL for e in seen):
                    # Shorter than the grace (3 s): the client leaves before it ends.
                    try:
                        got = await collect(
                            http, url, headers={"Last-Event-ID": last_id}, timeout=1
                        )
                    except httpx.HTTPStatusError as exc:  # 503 while Redis comes back
                        assert exc.response.status_code == 503, exc
                        continue
                    seen += got.events
                    last_id = got.resume_id if got.events else last_id
            assert [e.kind for e in seen if e.kind in TERMINAL] == ["failed"], describe(seen)
            assert seen[-1].data["error"]["code"] == "state_lost"
            assert (await http.get(f"/v1/jobs/{queued}")).status_code == 404
