"""``pushsvc bench neighbours``: one API process under a noisy tenant's heavy streams and
reads, and what another tenant's status polls see meanwhile.

Four attacks, one after another, each while the neighbour polls ``GET /v1/jobs/{id}``
of its own small job: ``readers`` (sockets that never read, opened at once on one
running job with a large output), ``herd`` (clients reopening that job's stream at once
with ``Last-Event-ID``, as after an API process died), ``replays`` (multiplexed streams
replaying a tenant log of a few MB) and ``listing`` (``GET /v1/jobs?type=<none>`` over
many jobs). Figures per attack: the neighbour's latency and failures, the attackers'
outcomes, and the API log's internal errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import psutil  # type: ignore[import-untyped]
from httpx_sse import SSEError, aconnect_sse
from rich.console import Console

from ..procs import RedisServer, free_port, spawn, stop_all, wait_until
from .clients import PER_CLIENT, TERMINAL, Clients, http_client
from .stack import BenchError, scrape, stack_env, start_api, workers_seen

KEYS = {"noisy": "bench-noisy", "neighbour": "bench-neighbour", "lister": "bench-lister"}
OUTPUT_KIB = 10 * 1024  # the readers' and the herd's job
REPLAY_KIB = 4400  # the replayed tenant log
REPLAYS, LISTERS = 20, 12
POLLERS, POLL_GAP_S = 4, 0.02  # the neighbour: 4 pollers, 20 ms between polls each
RCVBUF = 16384  # a reader's receive window: the backlog lands in the API, not the kernel
LOG_MARKS = {
    "internal_errors": "Traceback",
    "response_already_started": "response already started",
    "pool_timeouts": "No connection available",
}


def _pct(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else None


# -- the stack ----------------------------------------------------------------------


@dataclass
class Stack:
    url: str
    pid: int
    log: Path

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEYS[who]}"}

    def log_marks(self) -> dict[str, int]:
        text = self.log.read_text(errors="replace")
        return {name: text.count(mark) for name, mark in LOG_MARKS.items()}


@contextlib.contextmanager
def neighbours_stack(workers: int, log: Console) -> Iterator[Stack]:
    """A private Redis, one API process (pool of 2, the default) and ``workers``
    workers that know the bench's job types, with three tenants."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise BenchError("the neighbours bench needs redis-server on PATH")
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="pushsvc-bench-"))
        redis = RedisServer(dir=workdir, exe=exe)
        redis.start()
        stack.callback(redis.kill)
        tenants = {key: key for key in KEYS.values()}
        env = stack_env(redis.url, tenants, job_modules="pushsvc.tools.bench.jobtypes")
        procs: list[subprocess.Popen[bytes]] = []
        stack.callback(stop_all, procs)
        for i in range(workers):
            procs.append(spawn(["worker"], env, Path(workdir, f"worker{i}.log")))
        port, api_log = free_port(), Path(workdir, "api.log")
        procs.append(start_api(port, env, api_log))
        url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {KEYS['noisy']}"}
        wait_until(lambda: workers_seen(url, workers, headers), 30, f"{workers} workers up")
        log.print(f"bench: Redis :{redis.port}, API {url}, {workers} worker(s)")
        yield Stack(url, procs[-1].pid, api_log)


# -- the neighbour ------------------------------------------------------------------


@dataclass
class Neighbour:
    """Polls its own job's status while an attack runs: latency and answers."""

    latencies_ms: list[float] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)

    async def poll(self, http: httpx.AsyncClient, url: str, stop: Any) -> None:
        """Until ``stop`` (a multiprocessing.Event) is set."""
        while not stop.is_set():
            started = time.perf_counter()
            try:
                resp = await http.get(url)
                self.answers[str(resp.status_code)] += 1
            except httpx.HTTPError as exc:
                self.answers[type(exc).__name__] += 1
            self.latencies_ms.append(1000 * (time.perf_counter() - started))
            await asyncio.sleep(POLL_GAP_S)

    def figures(self) -> dict[str, Any]:
        ms = self.latencies_ms
        return {
            "neighbour_requests": len(ms),
            "neighbour_failed": sum(n for a, n in self.answers.items() if a != "200"),
            "neighbour_p50_ms": _pct(ms, 0.5),
            "neighbour_p99_ms": _pct(ms, 0.99),
            "neighbour_max_ms": max(ms, default=None),
        }


def _neighbour_process(url: str, headers: dict[str, str], ready: Any, stop: Any, out: Any) -> None:
    """The neighbour in a process (and event loop) of its own, so that the load
    generator's work is not in its figures; sends them through ``out`` when stopped."""

    async def run() -> Neighbour:
        neighbour = Neighbour()
        async with http_client(POLLERS) as http:
            http.headers.update(headers)
            await asyncio.gather(*(http.get(url) for _ in range(POLLERS)))  # connected
            ready.set()
            await asyncio.gather(*(neighbour.poll(http, url, stop) for _ in range(POLLERS)))
        return neighbour

    out.send(asyncio.run(run()).figures())


async def measured(
    stack: Stack, job_url: str, attack: Callable[[], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """Run ``attack`` while the neighbour polls; its figures, the neighbour's and the
    API log's new internal errors."""
    marks = stack.log_marks()
    mp = multiprocessing.get_context("spawn")
    ready, stop = mp.Event(), mp.Event()
    receiver, sender = mp.Pipe(duplex=False)
    args = (job_url, stack.auth("neighbour"), ready, stop, sender)
    poller = mp.Process(target=_neighbour_process, args=args, daemon=True)
    poller.start()
    try:
        if not await asyncio.to_thread(ready.wait, 30):
            raise BenchError("the neighbour's poller did not start")
        started = time.monotonic()
        figures = await attack()
        figures["attack_s"] = time.monotonic() - started
    finally:
        stop.set()
    neighbour: dict[str, Any] = await asyncio.to_thread(receiver.recv)
    poller.join(10)
    after = stack.log_marks()
    return {**figures, **neighbour, **{k: after[k] - marks[k] for k in marks}}


# -- the attacks --------------------------------------------------------------------


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
        "list_p50_ms": _pct(times, 0.5),
        "list_max_ms": max(times, default=None),
    }


# -- the run ------------------------------------------------------------------------


async def _submit(http: httpx.AsyncClient, url: str, who: str, body: dict[str, Any]) -> str:
    headers = {"Authorization": f"Bearer {who}"}
    try:
        resp = await http.post(f"{url}/v1/jobs", json=body, headers=headers)
    except (httpx.ReadError, httpx.RemoteProtocolError):
        # A keep-alive connection closed as it was reused (seen under bursts of
        # submissions, with or without this bench's load): retried, as a client would.
        resp = await http.post(f"{url}/v1/jobs", json=body, headers=headers)
    if resp.status_code != 202:
        raise BenchError(f"POST /v1/jobs answered {resp.status_code}: {resp.text[:300]}")
    return str(resp.json()["id"])


async def _prepare(stack: Stack, jobs: int, log: Console) -> dict[str, str]:
    """The noisy job (10 MiB written, then ticking), the lister's finished job with a
    log of about 4.5 MB and ``jobs`` finished small jobs, and the neighbour's own job."""
    url, quick = stack.url, {"type": "ticker", "payload": {"steps": 1, "interval_ms": 0}}
    async with http_client(32) as http:
        ids = {
            "neighbour": await _submit(http, url, KEYS["neighbour"], quick),
            "replayed": await _submit(
                http, url, KEYS["lister"], {"type": "bulky", "payload": {"output_kib": REPLAY_KIB}}
            ),
        }
        todo = iter(range(jobs))

        async def submitter() -> None:
            for _ in todo:
                await _submit(http, url, KEYS["lister"], quick)

        await asyncio.gather(*(submitter() for _ in range(min(32, jobs))))
        noisy = {"output_kib": OUTPUT_KIB, "ticks": 36000, "tick_ms": 100}
        ids["noisy"] = await _submit(http, url, KEYS["noisy"], {"type": "bulky", "payload": noisy})
        await _settled(http, stack, ids["noisy"])
    log.print(f"bench: {jobs} jobs listed, the noisy job has {OUTPUT_KIB // 1024} MiB of output")
    return ids


async def _settled(http: httpx.AsyncClient, stack: Stack, noisy: str) -> None:
    """Wait until only the noisy job runs and it has written all its output."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        (metrics,) = await scrape(http, [stack.url])
        resp = await http.get(f"{stack.url}/v1/jobs/{noisy}", headers=stack.auth("noisy"))
        job = resp.json()
        quiet = metrics.get("pushsvc_queue_depth", 1) == 0
        if quiet and job.get("stage") == "ticking" and len(job["output"]) >= OUTPUT_KIB * 1024:
            return
        await asyncio.sleep(0.5)
    raise BenchError("the jobs did not settle in 120 s")


async def _quiet(stack: Stack) -> None:
    """Between attacks: every stream of the last one closed on the server."""
    async with http_client() as http:

        async def open_streams() -> int:
            (metrics,) = await scrape(http, [stack.url])
            return metrics.get("pushsvc_open_streams", 0)

        deadline = time.monotonic() + 30
        while await open_streams() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)


class Sizes(Protocol):
    """bench.Options as read here: streams (readers that never read), clients (the
    herd), jobs (the lister's), workers, duration_s (readers' hold, listers' time)."""

    @property
    def streams(self) -> int: ...
    @property
    def clients(self) -> int: ...
    @property
    def jobs(self) -> int: ...
    @property
    def workers(self) -> int: ...
    @property
    def duration_s(self) -> float: ...


async def run_neighbours(stack: Stack, o: Sizes, log: Console) -> dict[str, Any]:
    streams, clients, hold_s = o.streams, o.clients, o.duration_s
    ids = await _prepare(stack, o.jobs, log)
    job_url = f"{stack.url}/v1/jobs/{ids['neighbour']}"
    attacks: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
        ("readers", lambda: readers_attack(stack, ids["noisy"], streams, hold_s)),
        ("herd", lambda: herd_attack(stack, ids["noisy"], clients)),
        ("replays", lambda: replays_attack(stack, ids["replayed"])),
        ("listing", lambda: listing_attack(stack, hold_s)),
    ]
    out: dict[str, Any] = {}
    for name, attack in attacks:
        log.print(f"bench: {name}")
        out[name] = await measured(stack, job_url, attack)
        await _quiet(stack)
    return out


def neighbours(urls: list[str] | None, o: Sizes, log: Console) -> dict[str, Any]:
    """The scenario, on its own stack: it needs three tenants and the bench's job types."""
    if urls is not None:
        raise BenchError("neighbours runs on its own stack only (no --url)")
    with neighbours_stack(o.workers, log) as stack:
        return asyncio.run(run_neighbours(stack, o, log))
