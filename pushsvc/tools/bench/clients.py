"""The load generator's side of ``pushsvc bench``: httpx clients, streams, submitters,
and the all-jobs stream that tells when each change was published and each job ended."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from .stack import BenchError

TERMINAL = frozenset({"completed", "failed", "cancelled"})


PER_CLIENT = 16  # stream or polling users to one httpx client


def http_client(keepalive: int = PER_CLIENT) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(30.0, read=60.0),  # heartbeats come every 15 s
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=keepalive),
    )


class Clients:
    """httpx clients for many concurrent users, ``per_client`` users to a client.

    httpcore's pool checks every connection of its client on each request, so one
    client for thousands of connections made the load generator quadratic (profiled:
    half its CPU in ``_assign_requests_to_connections`` at 32 submitters).
    """

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self._clients: list[httpx.AsyncClient] = []

    def __getitem__(self, user: int) -> httpx.AsyncClient:
        while len(self._clients) <= user // self.per_client:
            self._clients.append(http_client(self.per_client))
        return self._clients[user // self.per_client]

    async def __aenter__(self) -> Clients:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await asyncio.gather(*(c.aclose() for c in self._clients))


async def read_stream(
    http: httpx.AsyncClient,
    url: str,
    on_event: Callable[[str, dict[str, Any]], None],
    opened: Callable[[], None] | None = None,
) -> None:
    """Read ``url``'s events until the server ends the stream."""
    async with aconnect_sse(http, "GET", url) as source:
        source.response.raise_for_status()
        if opened is not None:
            opened()
        async for sse in source.aiter_sse():
            if sse.event == "queue":
                continue  # a queued job's place in line: not a published event
            if sse.event == "message" and sse.data == "":
                continue  # httpx-sse 0.4.3 turns heartbeat comments into these
            on_event(sse.event, json.loads(sse.data))


async def submit_ticker(http: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> str:
    resp = await http.post(f"{url}/v1/jobs", json={"type": "ticker", "payload": payload})
    if resp.status_code != 202:
        raise BenchError(f"POST /v1/jobs answered {resp.status_code}: {resp.text[:300]}")
    return str(resp.json()["id"])


async def submit_many(
    urls: list[str], n: int, concurrency: int, payload: dict[str, Any]
) -> list[str]:
    """``n`` submissions from ``concurrency`` submitters, each with a client of its own."""
    ids: list[str] = []
    todo = iter(range(n))  # shared: each submitter takes the next index

    async def submitter(i: int, http: httpx.AsyncClient) -> None:
        for _ in todo:
            ids.append(await submit_ticker(http, urls[i % len(urls)], payload))

    async with Clients(1) as clients:
        await asyncio.gather(*(submitter(i, clients[i]) for i in range(min(n, concurrency))))
    return ids


async def tickers(
    http: httpx.AsyncClient, urls: list[str], jobs: int, rate: float, steps: int
) -> list[str]:
    """``jobs`` tickers at ``rate`` steps/s, their starts spread over one interval."""
    payload = {"steps": min(10000, max(1, steps)), "interval_ms": round(1000 / rate)}
    ids = []
    for i in range(jobs):
        ids.append(await submit_ticker(http, urls[i % len(urls)], payload))
        await asyncio.sleep(1 / rate / jobs)
    return ids


async def cancel_all(http: httpx.AsyncClient, url: str, ids: list[str]) -> None:
    for job_id in ids:
        with contextlib.suppress(httpx.HTTPError):
            await http.delete(f"{url}/v1/jobs/{job_id}")


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"{what} did not happen in {timeout:g} s")
        await asyncio.sleep(0.05)


@dataclass
class Watcher:
    """The tenant's all-jobs stream: when each change was published, which jobs ended."""

    changes: dict[str, dict[int, float]] = field(default_factory=lambda: defaultdict(dict))
    ended: set[str] = field(default_factory=set)
    opened: asyncio.Event = field(default_factory=asyncio.Event)

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        job_id, seq = data["job_id"], data["seq"]
        if kind != "snapshot" or not data.get("reset"):  # a reset snapshot is no change
            self.changes[job_id].setdefault(seq, data["ts"])
        if kind in TERMINAL or (kind == "snapshot" and data.get("status") in TERMINAL):
            self.ended.add(job_id)

    @contextlib.asynccontextmanager
    async def running(self, http: httpx.AsyncClient, url: str) -> AsyncIterator[asyncio.Task[None]]:
        task = asyncio.create_task(
            read_stream(http, f"{url}/v1/events", self.on_event, self.opened.set)
        )
        waiter = asyncio.create_task(self.opened.wait())
        try:
            await asyncio.wait({waiter, task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            if not self.opened.is_set():
                if task.done():
                    task.result()  # raises what went wrong
                raise BenchError("GET /v1/events did not open in 30 s")
            yield task
        finally:
            waiter.cancel()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
