"""``pushsvc.client``: follow() against real API processes (in order, across an API
restart, by polling when streams are off) (``pushsvc submit``: tests/tools/test_submit.py;
the golden cases of ``apply_event``: tests/test_job_view.py).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import pytest

from pushsvc.client import Client
from pushsvc.epoch import StreamPosition, new_epoch
from pushsvc.errors import NotFound
from pushsvc.job_view import Event, JobTracker, apply_event
from pushsvc.snapshots import lost_frame

from . import conftest
from .procs import Api, Proc, RedisServer

TICKER = "ticker"


async def collect(client: Client, job_id: str) -> list[Event]:
    async with asyncio.timeout(30):
        return [event async for event in client.follow(job_id)]


def assert_complete_and_gap_free(events: list[Event], stored: list[tuple[str, Any]]) -> None:
    """A snapshot, then exactly the stored events after it, in order, ending in the end
    (``queue`` events are volatile, never stored: line.py)."""
    assert events[0].kind == "snapshot", events[0]
    after = events[0].data["seq"]
    rest = [e for e in events[1:] if e.kind != "queue"]
    assert [e.id for e in rest] == list(range(after + 1, after + 1 + len(rest)))
    assert [(e.kind, e.data) for e in rest] == [s for s in stored if s[1]["seq"] > after]
    assert rest[-1].kind == "completed"


async def test_follow_gets_every_event_in_order(
    stack: dict[str, Any], client: conftest.Client
) -> None:
    async with Client(stack["api"].url, "key-a") as pc:
        job = await pc.submit(TICKER, {"steps": 12, "interval_ms": 30})
        events = await collect(pc, job["id"])
        assert_complete_and_gap_free(events, await client.log(job["id"]))
        assert {e.source for e in events} == {"stream"}
        assert events[-1].data["result"] == {"steps": 12}
        progress = [e.data["progress"] for e in events if e.kind == "progress"]
        assert progress == sorted(progress) and progress[-1] == 100

        # A late joiner: the finished job's snapshot and its terminal event, then the end.
        late = await collect(pc, job["id"])
        assert [e.kind for e in late] == ["snapshot", "completed"]
        assert late[0].data["status"] == "completed"
        assert late[1] == events[-1]


async def test_follow_reports_api_errors(stack: dict[str, Any]) -> None:
    async with Client(stack["api"].url, "key-a") as pc:
        job = await pc.submit(TICKER, {"steps": 1, "interval_ms": 0})
    async with Client(stack["api"].url, "key-b") as other:  # another tenant: never yours
        with pytest.raises(NotFound) as caught:
            await collect(other, job["id"])
        assert caught.value.status_code == 404 and caught.value.code == "job_not_found"


async def test_submit_get_cancel_and_idempotency(stack: dict[str, Any]) -> None:
    async with Client(stack["api"].url, "key-a") as pc:
        payload = {"steps": 200, "interval_ms": 50}
        job = await pc.submit(TICKER, payload, priority="high", idempotency_key="k-1")
        again = await pc.submit(TICKER, payload, priority="high", idempotency_key="k-1")
        assert again["id"] == job["id"] and job["priority"] == "high"
        events = pc.follow(job["id"])
        async with asyncio.timeout(30):
            async for event in events:
                if event.kind == "progress":
                    break
            await pc.cancel(job["id"])
            rest = [event async for event in events]
        assert rest[-1].kind == "cancelled"
        assert (await pc.get(job["id"]))["status"] == "cancelled"


@pytest.mark.timeout(90)
async def test_follow_survives_an_api_restart(
    stack: dict[str, Any], client: conftest.Client
) -> None:
    """Stop the API mid-job, start a new one on the same port: resume, no gap, no repeat."""
    first = Api([], stack["env"]).start()
    second: Api | None = None
    try:
        async with Client(first.url, "key-a") as pc:
            job = await pc.submit(TICKER, {"steps": 40, "interval_ms": 100})
            events: list[Event] = []
            async with asyncio.timeout(60):
                stream = pc.follow(job["id"])
                async for event in stream:
                    events.append(event)
                    if event.kind == "progress" and event.data["progress"] >= 20:
                        break
                # The API goes away while we hold the stream open, and comes back.
                await asyncio.to_thread(first.stop)
                before_restart = len(events)
                second = Api([], stack["env"], port=first.port)
                await asyncio.to_thread(second.start)
                events += [event async for event in stream]
        assert events[before_restart - 1].data["progress"] < 100
        assert len(events) > before_restart + 1  # live events from the new process
        assert_complete_and_gap_free(events, await client.log(job["id"]))
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_follow_polls_when_streams_are_disabled(
    stack: dict[str, Any], client: conftest.Client
) -> None:
    api = Api([], {**stack["env"], "PUSHSVC_STREAMS_ENABLED": "false"}).start()
    try:
        async with Client(api.url, "key-a", poll_min=0.1) as pc:
            job = await pc.submit(TICKER, {"steps": 15, "interval_ms": 200})
            events = await collect(pc, job["id"])
    finally:
        api.stop()
    assert {e.source for e in events} == {"poll"}
    assert events[0].kind == "snapshot"
    assert events[-1].kind == "completed" and events[-1].data["result"] == {"steps": 15}
    assert [e.kind for e in events].count("completed") == 1
    progress = [e.data["progress"] for e in events if e.kind == "progress"]
    assert len(progress) >= 2 and progress == sorted(progress), progress
    seqs = [e.id for e in events]
    assert seqs == sorted(seqs)
    assert seqs[-1] == (await client.get(job["id"]))["seq"]


@pytest.mark.timeout(60)
async def test_polled_events_carry_the_jobs_times_and_partial_result(
    redis_server: RedisServer,
) -> None:
    """Was: ``diff_snapshots`` stamped every polled event with the poll's time, so a
    poller's ``started_at``/``finished_at`` (``apply_event`` takes them from ``ts``) were
    when it polled, not the job's; and its ``failed`` event had no ``result``, so a
    poller that saw the job running never got the partial result the failed job keeps."""
    env = conftest.stack_env(
        redis_server.url,
        f"p{secrets.token_hex(3)}",
        streams_enabled="false",
        poll_hint_s="0.05",
        job_modules="tests.jobtypes,tests.golden",  # "golden": fails keeping its text
    )
    api = Api([], env).start()
    worker = Proc(["worker"], env)
    try:
        async with Client(api.url, "key-a", poll_min=0.05, poll_max=0.2) as pc:
            job = await pc.submit("golden", {"words": 6, "interval_ms": 100, "fatal": True})
            async with asyncio.timeout(30):
                follow = pc.follow(job["id"])
                events = [await anext(follow)]
                assert events[0].data["status"] == "queued", events  # no worker yet
                worker.start()
                events += [event async for event in follow]
            server = await pc.get(job["id"])
    finally:
        worker.stop()
        api.stop()
    assert {e.source for e in events} == {"poll"}
    assert ("status", "running") in [(e.kind, e.data.get("status")) for e in events]
    assert events[-1].kind == "failed" and server["result"]["text"], server
    held: dict[str, Any] = {}
    for event in events:
        held = apply_event(held, event.kind, event.data)
    for name in ("started_at", "finished_at", "result", "error", "output", "status"):
        assert held[name] == server[name], (name, held[name], server[name])


async def test_tracker_takes_a_state_lost_end_numbered_below_what_it_saw(
    stack: dict[str, Any],
) -> None:
    """Was: ``JobTracker`` (then ``client._Tracker``) dropped a ``failed``/``state_lost``
    end whose seq was not above the job's last one, so ``follow()`` never ended a job the
    store lost when the API numbered that end in a new history (from nothing it knows:
    seq 1), as pushsvc.js does not. Stale events, and a second end, are still dropped."""
    async with Client(stack["api"].url, "key-a") as pc:
        job = await pc.submit(TICKER, {"steps": 200, "interval_ms": 50})
        seen = JobTracker()
        async with asyncio.timeout(30):
            async for event in pc.follow(job["id"]):
                assert seen.accept(event)
                if event.kind == "progress":
                    break
        await pc.cancel(job["id"])
    assert seen.seq > 1 and not seen.ended
    stale = Event(seen.seq - 1, "progress", {**event.data, "seq": seen.seq - 1}, epoch=seen.epoch)
    assert not seen.accept(stale)

    # The end as an API process that knows nothing of the job sends it, in a new epoch.
    frame = lost_frame(job["id"], StreamPosition(0, new_epoch()), None)
    lost = Event(frame.seq, frame.kind, json.loads(frame.data), "stream", frame.epoch)
    assert lost.id < seen.seq
    assert seen.accept(lost)
    assert seen.ended and seen.job is not None
    assert seen.job["status"] == "failed" and seen.job["error"]["code"] == "state_lost"
    assert seen.position == StreamPosition(lost.id, lost.epoch)
    assert not seen.accept(lost)  # the same end again: a duplicate
