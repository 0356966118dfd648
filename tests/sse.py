"""A small SSE test client over real sockets (httpx + httpx-sse)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from pushsvc.models import TERMINAL


@dataclass
class Event:
    id: int  # the position's seq (the job's, or the tenant's on a multiplexed stream)
    kind: str
    data: dict[str, Any]
    epoch: str = ""  # the history ``id`` counts in

    @property
    def raw_id(self) -> str:
        """The SSE id as sent (``<seq>.<epoch>``): what EventSource echoes back."""
        return f"{self.id}.{self.epoch}" if self.epoch else str(self.id)


@dataclass
class Stream:
    """Events read so far from one stream, and whether the server ended it."""

    events: list[Event] = field(default_factory=list)
    closed: bool = False
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)

    def of(self, job_id: str) -> list[Event]:
        return [e for e in self.events if e.data.get("job_id") == job_id]

    @property
    def last_id(self) -> int:
        return self.events[-1].id

    @property
    def resume_id(self) -> str:
        """The Last-Event-ID a browser would send to resume this stream."""
        return self.events[-1].raw_id


async def events(
    http: httpx.AsyncClient,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    queue: bool = False,
) -> AsyncIterator[Event]:
    """The stream's events; ``queue`` events (volatile: no id, never replayed) only when
    asked for, so the history the other tests check is the logged one."""
    async with aconnect_sse(http, "GET", url, headers=headers or {}) as source:
        source.response.raise_for_status()
        async for sse in source.aiter_sse():
            if sse.event == "message" and sse.data == "":
                continue  # httpx-sse 0.4.3 turns heartbeat comments into these
            if sse.event == "queue" and not queue:
                continue
            seq, _, epoch = sse.id.partition(".")  # none before a first ``queue`` event
            yield Event(int(seq or 0), sse.event, json.loads(sse.data), epoch)


async def read(
    http: httpx.AsyncClient,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    stop: Callable[[Stream], bool] | None = None,
    timeout: float = 20,
    queue: bool = False,
) -> Stream:
    """Read until the server closes the stream, or ``stop`` says enough."""
    out = Stream()
    async with asyncio.timeout(timeout):
        async for event in events(http, url, headers=headers, queue=queue):
            out.events.append(event)
            if stop is not None and stop(out):
                return out
    out.closed = True
    return out


def assert_gap_free(stream: Stream, job_id: str) -> None:
    """A snapshot (or a resume), then each later event once, in seq order."""
    evs = stream.of(job_id)
    assert evs, "no events for the job"
    seqs = [e.data["seq"] for e in evs]
    body = seqs[1:] if evs[0].kind == "snapshot" else seqs
    start = seqs[0] if evs[0].kind == "snapshot" else body[0] - 1
    terminal_echo = evs[0].kind == "snapshot" and len(evs) == 2 and evs[1].kind in TERMINAL
    if not terminal_echo:  # a late joiner gets the terminal event with the snapshot's seq
        assert body == list(range(start + 1, start + 1 + len(body))), seqs


def assert_ids_cover(events: list[Event], first: int, last: int, logged: dict[int, str]) -> int:
    """Ids ``first`` to ``last`` in order, each once; ids skipped only where a ``progress``
    or ``output`` event stands for the ones before it, of its kind in the job's log
    (``logged``: id -> kind), which the contract lets a slow reader's buffer merge into the
    newest. Returns how many events were merged away."""
    prev, skipped = first - 1, 0
    for event in events:
        assert event.id > prev, [e.id for e in events]
        if event.id > prev + 1:
            kinds = {logged[i] for i in range(prev + 1, event.id)}
            assert event.kind in ("progress", "output") and kinds == {event.kind}, (
                prev,
                event.id,
                event.kind,
                kinds,
            )
            skipped += event.id - prev - 1
        prev = event.id
    assert prev == last, [e.id for e in events]
    return skipped


def output_of(stream: Stream) -> str:
    """The text a client rebuilds: snapshots replace ``output``, deltas append."""
    text = ""
    for event in stream.events:
        if event.kind == "snapshot":
            text = event.data["output"]
        elif event.kind == "output":
            text += event.data["delta"]
    return text


async def metrics(http: httpx.AsyncClient) -> dict[str, float]:
    """The API process's unlabelled ``pushsvc_*`` series."""
    body = (await http.get("/metrics")).text
    return {
        line.split()[0]: float(line.split()[1])
        for line in body.splitlines()
        if line.startswith("pushsvc_")
    }


async def settled(
    http: httpx.AsyncClient, streams: int, tasks_at_most: float | None = None
) -> dict[str, float]:
    """Metrics once the server has seen every connection open or close (and, given
    ``tasks_at_most``, once the tasks of those that closed have ended: a stream's count
    drops before its request task has unwound; a leaked task never ends)."""
    async with asyncio.timeout(20):
        while True:
            stats = await metrics(http)
            tasks_done = tasks_at_most is None or stats["pushsvc_asyncio_tasks"] <= tasks_at_most
            if stats["pushsvc_open_streams"] == streams and tasks_done:
                return stats
            await asyncio.sleep(0.05)  # polling another process's counters
