"""Bulk reads (pushsvc/reads.py): the gate, and snapshot reads shared only when safe."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from pushsvc.epoch import StreamPosition
from pushsvc.events import QueueStats
from pushsvc.frames import Frame
from pushsvc.job_stream import JobStream
from pushsvc.reads import BulkReads, StoredJob
from pushsvc.settings import Settings
from pushsvc.store import JobStore
from pushsvc.streams import PING

JOB = {
    "id": "j",
    "type": "ticker",
    "tenant": "t",
    "status": "running",
    "created_at": 1.0,
    "output": "",
}


@dataclass
class FakeStore:
    """Stands in for JobStore: each read is held until the test lets it answer."""

    sent: list[str] = field(default_factory=list)  # reads as Redis would have got them
    answers: asyncio.Queue[None] = field(default_factory=asyncio.Queue)
    inside: int = 0
    most_inside: int = 0

    async def load_with_last(self, _tenant: str, job_id: str) -> tuple[dict[str, Any], None]:
        self.sent.append(job_id)
        seq = len(self.sent)  # each read sees a later state than the one before
        await self._held()
        return {**JOB, "id": job_id, "seq": seq}, None

    async def events_after(
        self, _tenant: str, job_id: str, after: StreamPosition, limit: int
    ) -> None:
        await self._held()

    async def _held(self) -> None:
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            await self.answers.get()
        finally:
            self.inside -= 1


def reads_of(store: FakeStore, concurrency: int = 1) -> BulkReads:
    settings = Settings(bulk_read_concurrency=concurrency)
    return BulkReads(cast(JobStore, store), settings)


async def until(check: Any) -> None:
    """Let the tasks under test run until ``check()`` (they need only the event loop)."""
    async with asyncio.timeout(5):
        while not check():
            await asyncio.sleep(0)


@pytest.mark.timeout(10)
async def test_streams_asking_together_share_one_read() -> None:
    store = FakeStore()
    reads = reads_of(store)
    # Another job's read holds the gate: the next read of job j waits, boarding.
    other = asyncio.create_task(reads.job("t", "other"))
    await until(lambda: store.sent == ["other"])
    askers = [asyncio.create_task(reads.job("t", "j")) for _ in range(3)]
    await until(lambda: reads.joined == 2)
    store.answers.put_nowait(None)  # "other" answers; j's one read goes out
    await until(lambda: store.sent == ["other", "j"])
    store.answers.put_nowait(None)
    found = await asyncio.gather(*askers)
    await other
    assert store.sent == ["other", "j"] and reads.reads == 2
    assert found[0] is found[1] is found[2]
    assert isinstance(found[0], StoredJob) and found[0].snap.seq == 2


@pytest.mark.timeout(10)
async def test_a_read_already_sent_is_not_joined() -> None:
    """A stream must read state newer than its subscription: a read sent before it asked
    may predate that, so it waits for a read of its own."""
    store = FakeStore()
    reads = reads_of(store, concurrency=2)  # the gate would let both reads out at once
    first = asyncio.create_task(reads.job("t", "j"))
    await until(lambda: store.sent == ["j"])
    second = asyncio.create_task(reads.job("t", "j"))
    await until(lambda: store.sent == ["j", "j"])
    for _ in range(2):
        store.answers.put_nowait(None)
    one, two = await first, await second
    assert reads.joined == 0 and one is not two
    assert one is not None and two is not None and (one.snap.seq, two.snap.seq) == (1, 2)


@pytest.mark.timeout(10)
async def test_a_stream_that_leaves_does_not_cancel_the_read_for_the_others() -> None:
    store = FakeStore()
    reads = reads_of(store)
    leaving, staying = (asyncio.create_task(reads.job("t", "j")) for _ in range(2))
    await until(lambda: store.sent == ["j"])
    leaving.cancel()
    store.answers.put_nowait(None)
    found = await staying
    assert found is not None and found.snap.id == "j"
    assert leaving.cancelled()


@pytest.mark.timeout(10)
async def test_the_gate_lets_that_many_reads_out_at_once() -> None:
    store = FakeStore()
    reads = reads_of(store)
    waiting = [
        asyncio.create_task(reads.events_after("t", "j", StreamPosition(0), 10)) for _ in range(5)
    ]
    for _ in waiting:
        await until(lambda: store.inside == 1)
        store.answers.put_nowait(None)
    await asyncio.gather(*waiting)
    assert store.most_inside == 1


class FailingReads:
    """Bulk reads whose Redis is gone."""

    store: Any = None

    def recent(self, tenant: str, job_id: str) -> StoredJob | None:
        return None

    async def job(self, tenant: str, job_id: str) -> StoredJob | None:
        raise RedisConnectionError("No connection available.")


class FakeBus:
    """Subscribes at once; or only at the wait after ``unconfirmed`` failed ones."""

    stats = QueueStats()

    def __init__(self, unconfirmed: int = 0) -> None:
        self.unconfirmed = unconfirmed

    def subscription(self, *_args: Any) -> Any:
        return _Subscribed(self)


class _Subscribed:
    def __init__(self, bus: FakeBus) -> None:
        self.bus = bus

    async def __aenter__(self) -> Callable[[], Awaitable[None]]:
        return self.ready

    async def ready(self) -> None:
        if self.bus.unconfirmed:
            self.bus.unconfirmed -= 1
            raise RedisConnectionError("pub/sub subscription was not confirmed")

    async def __aexit__(self, *_exc: object) -> None:
        return None


@pytest.mark.timeout(10)
async def test_a_redis_error_in_a_started_stream_ends_it_as_a_response() -> None:
    """Regression: a pool timeout while a stream read its snapshot escaped the response
    after it had started ("Caught handled exception, but response already started"):
    the client saw an aborted response and the log an internal error. Now the stream
    waits for Redis (heartbeats) and, past ``redis_wait_s``, ends, complete, and the
    client resumes with Last-Event-ID."""
    stream = JobStream(
        cast(BulkReads, FailingReads()), cast(Any, FakeBus()), Settings(), "t", "j", None
    )
    stream.channel = lambda: "channel"  # type: ignore[method-assign]
    stream.redis_wait_s = 0.0
    sent = [chunk async for chunk in stream.frames()]
    assert sent == [b"retry: 2000\n\n"]  # wait 0: ended at the first failure


class LoggedStore:
    """A job at seq 5 whose log has moved on to seq 7 since."""

    def __init__(self) -> None:
        self.reads = 0

    async def load_with_last(self, _tenant: str, job_id: str) -> tuple[dict[str, Any], None]:
        self.reads += 1
        return {**JOB, "seq": 5, "epoch": "e1"}, None

    async def events_after(
        self, _tenant: str, job_id: str, after: StreamPosition, limit: int
    ) -> tuple[list[Frame], str]:
        assert after == StreamPosition(5, "e1")
        return [Frame(0, seq, "progress", "j", f'{{"seq":{seq}}}', "e1") for seq in (6, 7)], "e1"


@pytest.mark.timeout(10)
async def test_a_new_stream_sends_the_snapshot_another_is_still_sending() -> None:
    """Slow readers arriving one after another used to read (and hold) a copy of a
    large snapshot each: 60 of them on a job with 10 MB of output held 1.3 GB. A new
    stream now sends the snapshot another stream still holds, then the events logged
    after it, read after subscribing."""
    store = LoggedStore()
    reads = BulkReads(cast(JobStore, store), Settings())
    bus = cast(Any, FakeBus())
    first = JobStream(reads, bus, Settings(), "t", "j", None)
    sent = await first.start()
    assert first.holding is not None and [f.seq for f in sent] == [5]
    second = JobStream(reads, bus, Settings(), "t", "j", None)
    again = await second.start()
    assert store.reads == 1 and again[0] is sent[0]  # the same frame, encoded once
    assert [(f.kind, f.seq) for f in again] == [("snapshot", 5), ("progress", 6), ("progress", 7)]
    assert second.pos == StreamPosition(7, "e1")
    first.holding = second.holding = None  # both sent it: the next stream reads anew
    del sent, again
    await asyncio.sleep(0)  # (the callback that resumed this task holds the read's result)
    third = JobStream(reads, bus, Settings(), "t", "j", None)
    await third.start()
    assert store.reads == 2


@pytest.mark.timeout(10)
async def test_what_one_stream_adds_after_a_shared_snapshot_stays_its_own() -> None:
    """The frames of a shared read are shared; the list a stream sends is its own."""
    store = LoggedStore()
    reads = BulkReads(cast(JobStore, store), Settings())
    bus = cast(Any, FakeBus())
    first, second = (JobStream(reads, bus, Settings(), "t", "j", None) for _ in range(2))
    one, two = await asyncio.gather(first.start(), second.start())
    one.append(Frame(0, 6, "progress", "j", "{}"))
    assert store.reads == 1 and len(two) == 1 and two[0] is one[0]


async def until_snapshot(stream: JobStream) -> list[bytes]:
    """The stream's chunks up to the one with its snapshot."""
    sent: list[bytes] = []
    async with contextlib.aclosing(stream.frames()) as frames:
        async for chunk in frames:
            sent.append(chunk)
            if b"event: snapshot" in chunk:
                break
    return sent


class RestartingStore(LoggedStore):
    """Redis unreachable for the first two reads (restarting), then there again."""

    async def load_with_last(self, _tenant: str, job_id: str) -> tuple[dict[str, Any], None]:
        self.reads += 1
        if self.reads <= 2:
            raise RedisConnectionError("Connection refused")
        return {**JOB, "seq": 5, "epoch": "e1"}, None


@pytest.mark.timeout(10)
async def test_a_started_stream_waits_for_redis_to_come_back() -> None:
    """Was (chaos run): a stream whose first read met a restarting Redis answered 200
    and closed with nothing, which a generic SSE client takes for the end. Now it sends
    heartbeats while it waits, then the snapshot."""
    store = RestartingStore()
    reads = BulkReads(cast(JobStore, store), Settings())
    stream = JobStream(reads, cast(Any, FakeBus()), Settings(), "t", "j", None)
    stream.channel = lambda: "channel"  # type: ignore[method-assign]
    sent = await until_snapshot(stream)
    assert sent[1:3] == [PING, PING] and store.reads == 3
    assert b'"seq":5' in sent[3]


@pytest.mark.timeout(10)
async def test_a_stream_waits_for_its_subscription_to_be_confirmed() -> None:
    """Was (the chaos run on a cluster): a stream whose subscription was not confirmed
    in ``stream_subscribe_timeout_s`` (its shard failing over) answered 200 and ended
    with nothing. Now it sends heartbeats while it waits again, then the snapshot."""
    store = LoggedStore()
    reads = BulkReads(cast(JobStore, store), Settings())
    stream = JobStream(reads, cast(Any, FakeBus(unconfirmed=2)), Settings(), "t", "j", None)
    stream.channel = lambda: "channel"  # type: ignore[method-assign]
    sent = await until_snapshot(stream)
    assert sent[0].startswith(b"retry:") and sent[1:3] == [PING, PING]
    assert store.reads == 1 and b'"seq":5' in sent[3]  # read once, after the confirmation
