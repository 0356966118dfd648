"""StreamQueue's backpressure rules, frame by frame (no I/O needed for these)."""

from __future__ import annotations

import json

from pushsvc.events import QueueStats, StreamQueue
from pushsvc.frames import Frame


def frame(seq: int, kind: str, job: str = "j", **data: object) -> Frame:
    body = json.dumps({"seq": seq, "job_id": job, **data})
    return Frame(seq + 100, seq, kind, job, body)


def queue(coalesce_after: int = 2, max_frames: int = 50, max_bytes: int = 10_000) -> StreamQueue:
    return StreamQueue(coalesce_after, max_frames, max_bytes, QueueStats())


async def test_below_the_threshold_every_frame_is_kept() -> None:
    q = queue(coalesce_after=10)
    for seq in range(1, 6):
        q.put(frame(seq, "progress", progress=seq))
    assert [f.seq for f in await q.get(1)] == [1, 2, 3, 4, 5]


async def test_progress_merges_latest_wins_and_output_concatenates() -> None:
    q = queue()
    q.put(frame(1, "status", status="running"))
    q.put(frame(2, "output", delta="Hel"))
    for seq, (kind, value) in enumerate(
        [("progress", 10), ("output", "lo, "), ("progress", 20), ("output", "world")], start=3
    ):
        q.put(frame(seq, kind, **({"progress": value} if kind == "progress" else {"delta": value})))
    frames = await q.get(1)
    assert [(f.kind, f.first_seq, f.seq) for f in frames] == [
        ("status", 1, 1),
        ("progress", 3, 5),
        ("output", 2, 6),
    ]
    assert json.loads(frames[2].data)["delta"] == "Hello, world"
    assert json.loads(frames[1].data)["progress"] == 20
    assert q.stats.merged == 3


async def test_nothing_merges_across_a_status_or_terminal_frame() -> None:
    q = queue(coalesce_after=1)
    q.put(frame(1, "progress", progress=50))
    q.put(frame(2, "status", status="queued"))
    q.put(frame(3, "progress", progress=0))
    q.put(frame(4, "completed", result=None))
    q.put(frame(5, "progress", progress=1))
    assert [f.seq for f in await q.get(1)] == [1, 2, 3, 4, 5]


async def test_frames_of_other_jobs_keep_their_own_merges() -> None:
    q = queue(coalesce_after=1)
    q.put(frame(1, "progress", "a", progress=1))
    q.put(frame(1, "progress", "b", progress=1))
    q.put(frame(2, "progress", "a", progress=2))
    frames = await q.get(1)
    assert [(f.job_id, f.seq) for f in frames] == [("b", 1), ("a", 2)]


async def test_overflow_drops_the_buffer_and_asks_for_a_resync() -> None:
    q = queue(coalesce_after=100, max_frames=5)
    for seq in range(1, 8):
        q.put(frame(seq, "status", status="running"))
    assert q.resync and q.overflowed and q.stats.resyncs == 1
    assert len(q) == 1  # only what came after the drop
    assert q.stats.buffered_bytes == len((await q.get(1))[0].data)
    assert q.stats.buffered_bytes == 0


async def test_byte_cap_holds_even_when_frames_merge() -> None:
    q = queue(coalesce_after=1, max_bytes=2_000)
    for seq in range(1, 200):
        q.put(frame(seq, "output", delta="x" * 50))
    assert q.stats.buffered_bytes <= 2_000 and q.resync


async def test_get_returns_empty_after_silence_for_a_heartbeat() -> None:
    q = queue()
    assert await q.get(0.01) == []
    q.put(frame(1, "status", status="running"))
    assert [f.seq for f in await q.get(0.01)] == [1]


async def test_a_queue_frame_replaces_the_jobs_pending_one_and_comes_last() -> None:
    """One place per job at most (line.py), after the frames it may depend on; those count
    toward no limit, so places alone never make a stream resync."""
    q = queue(coalesce_after=1, max_frames=2)
    for position in (3, 2, 1):
        q.put(frame(5, "queue", queue_position=position))
    q.put(frame(5, "queue", "k", queue_position=7))
    q.put(frame(6, "status", status="running"))
    frames = await q.get(1)
    assert [(f.kind, f.job_id) for f in frames] == [("status", "j"), ("queue", "j"), ("queue", "k")]
    assert json.loads(frames[1].data)["queue_position"] == 1 and not q.resync
