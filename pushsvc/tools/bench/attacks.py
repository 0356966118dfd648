"""The four attacks of ``pushsvc bench neighbours`` (readers, herd, replays, listing): each
run by the noisy tenant against a :class:`neighbours_stack.Stack`, returning its figures."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]
from httpx_sse import SSEError, aconnect_sse

from .clients import PER_CLIENT, TERMINAL, Clients, http_client
from .load import pct
from .neighbours_stack import KEYS, Stack
from .stack import scrape

REPLAYS, LISTERS = 20, 12
RCVBUF = 16384  # a reader's receive window: the backlog lands in the API, not the kernel


async def _non_reader(url: str, path: str, key: str) -> tuple[int, asyncio.StreamWriter]:
    """A socket with a small receive window that asks for a stream, reads the status
    line, and then nothing."""
    target = httpx.URL(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (target.host, target.port or 80))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {target.host}\r\nAuthorization: Bearer {key}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    status = await asyncio.wait_for(reader.readline(), 30)
    parts = status.split()
    return (int(parts[1]) if len(parts) > 1 else 0), writer


async def readers_attack(stack: Stack, job_id: str, n: int, hold_s: float) -> dict[str, Any]:
    """``n`` streams of one job opened at once by clients that never read; held open."""
    path = f"/v1/jobs/{job_id}/events"
    rss0 = psutil.Process(stack.pid).memory_info().rss
    opened = await asyncio.gather(
        *(_non_reader(stack.url, path, KEYS["noisy"]) for _ in range(n)), return_exceptions=True
    )
    statuses = Counter(str(o[0]) if isinstance(o, tuple) else type(o).__name__ for o in opened)
    try:
        await asyncio.sleep(hold_s)  # the job ticks on; the streams cannot send
        async with http_client() as http:
            (metrics,) = await scrape(http, [stack.url])
        rss = psutil.Process(stack.pid).memory_info().rss
    finally:
        for o in opened:
            if isinstance(o, tuple):
                o[1].close()
    return {
        "streams": n,
        "answers": dict(statuses),
        "open_streams": metrics.get("pushsvc_open_streams", 0),
        "api_rss_before_mib": rss0 / 2**20,
        "api_rss_mib": rss / 2**20,
    }


async def _follow(
    http: httpx.AsyncClient, url: str, headers: dict[str, str], done: Callable[[str, str], bool]
) -> str:
    """Read until ``done(kind, id)``; the outcome: ``good``, ``empty`` (200, closed with
    nothing), ``ended`` (closed before done), the status, or the error."""
    seen = 0
    try:
        async with aconnect_sse(http, "GET", url, headers=headers) as source:
            if source.response.status_code != 200:
                return str(source.response.status_code)
            async for sse in source.aiter_sse():
                if sse.event == "message" and sse.data == "":
                    continue  # httpx-sse's rendering of a heartbeat
                seen += 1
                if done(sse.event, sse.id):
                    return "good"
    except (httpx.HTTPError, SSEError) as exc:
        return type(exc).__name__
    return "ended" if seen else "empty"


async def herd_attack(stack: Stack, job_id: str, n: int) -> dict[str, Any]:
    """``n`` clients reopen the running job's stream at once, each a few events behind
    (``Last-Event-ID``); good once a live event after the resume point arrives."""
    async with http_client() as http:
        resp = await http.get(f"{stack.url}/v1/jobs/{job_id}", headers=stack.auth("noisy"))
    seq, _, epoch = resp.headers["etag"].strip('"').partition(".")
    headers = {**stack.auth("noisy"), "Last-Event-ID": f"{max(0, int(seq) - 3)}.{epoch}"}
    url = f"{stack.url}/v1/jobs/{job_id}/events"

    def live(kind: str, event_id: str) -> bool:
        return int(event_id.partition(".")[0]) > int(seq) or kind in TERMINAL

    async with Clients(PER_CLIENT) as clients:
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(_follow(clients[i], url, headers, live) for i in range(n))), 60
        )
    return {"clients": n, "outcomes": dict(Counter(outcomes))}


async def replays_attack(stack: Stack, job_id: str) -> dict[str, Any]:
    """REPLAYS multiplexed streams of the lister's finished job, each replaying the
    tenant's whole log (``Last-Event-ID: 0``) to the job's terminal event."""
    headers = {**stack.auth("lister"), "Last-Event-ID": "0"}
    url = f"{stack.url}/v1/events?job={job_id}"
    times: list[float] = []

    async def one(http: httpx.AsyncClient) -> str:
        started = time.monotonic()
        outcome = await _follow(http, url, headers, lambda kind, _: kind in TERMINAL)
        times.append(time.monotonic() - started)
        return outcome

    async with Clients(1) as clients:
        outcomes = await asyncio.gather(*(one(clients[i]) for i in range(REPLAYS)))
    return {"replays": REPLAYS, "outcomes": dict(Counter(outcomes)), "replay_max_s": max(times)}


async def listing_attack(stack: Stack, duration_s: float) -> dict[str, Any]:
    """LISTERS clients listing a type no job has, back to back, for ``duration_s``."""
    answers: Counter[str] = Counter()
    times: list[float] = []
    deadline = time.monotonic() + duration_s

    async def lister(http: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            resp = await http.get(f"{stack.url}/v1/jobs", params={"type": "nonexistent"})
            times.append(1000 * (time.perf_counter() - started))
            answers[str(resp.status_code)] += 1

    async with http_client(LISTERS) as http:
        http.headers.update(stack.auth("lister"))
        await asyncio.gather(*(lister(http) for _ in range(LISTERS)))
    return {
        "listers": LISTERS,
        "answers": dict(answers),
        "list_p50_ms": pct(times, 0.5),
        "list_max_ms": max(times, default=None),
    }
