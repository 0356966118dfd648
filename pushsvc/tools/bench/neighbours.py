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
import multiprocessing
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from rich.console import Console

from .attacks import herd_attack, listing_attack, readers_attack, replays_attack
from .clients import http_client
from .load import pct
from .neighbours_stack import KEYS, Stack, neighbours_stack
from .stack import BenchError, scrape

OUTPUT_KIB = 10 * 1024  # the readers' and the herd's job
REPLAY_KIB = 4400  # the replayed tenant log
POLLERS, POLL_GAP_S = 4, 0.02  # the neighbour: 4 pollers, 20 ms between polls each


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
            "neighbour_p50_ms": pct(ms, 0.5),
            "neighbour_p99_ms": pct(ms, 0.99),
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
