"""``pushsvc bench fairness``: one tenant's burst against another tenant's single job.

Tenant A submits ``jobs`` tickers of ``duration_s`` each at once; once they are all
queued, tenant B submits one. The figure is how long B's job waited to start, against
the time one job holds a worker slot (``duration_s``): with fair share B takes the next
free slot (the issue's target: at most ~2 slots); first in, first out it waits for A's
whole burst. Each mode runs on a stack of its own (``PUSHSVC_FAIR_SHARE`` true, false).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
from rich.console import Console

from ..procs import wait_until
from .clients import http_client
from .load import Options, pct, ratio
from .stack import BenchError, private, stack_env, workers_seen

KEYS = {"bench-a": "tenant-a", "bench-b": "tenant-b"}


@contextlib.contextmanager
def _stack(o: Options, fair: bool, log: Console) -> Iterator[str]:
    with private("fairness") as own:
        env = stack_env(own.redis.url, KEYS, fair_share=str(fair).lower())
        own.workers(o.workers, env)
        url, _ = own.api(env)
        auth = {"Authorization": "Bearer bench-a"}
        wait_until(lambda: workers_seen(url, o.workers, auth), 30, f"{o.workers} workers up")
        log.print(f"bench: fair share {'on' if fair else 'off'}, API {url}, {o.workers} worker(s)")
        yield url


async def _submit(http: httpx.AsyncClient, url: str, key: str, payload: dict[str, Any]) -> str:
    resp = await http.post(
        f"{url}/v1/jobs",
        json={"type": "ticker", "payload": payload},
        headers={"Authorization": f"Bearer {key}"},
    )
    if resp.status_code != 202:
        raise BenchError(f"POST /v1/jobs answered {resp.status_code}: {resp.text[:300]}")
    return str(resp.json()["id"])


async def _job(http: httpx.AsyncClient, url: str, key: str, job_id: str) -> dict[str, Any]:
    resp = await http.get(f"{url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"})
    return dict(resp.json())


async def _burst_then_one(url: str, o: Options, log: Console) -> dict[str, Any]:
    steps = 2
    payload = {"steps": steps, "interval_ms": round(o.duration_s * 1000 / steps)}
    async with http_client() as http:
        todo = iter(range(o.jobs))
        burst: list[str] = []

        async def submitter() -> None:
            for _ in todo:
                burst.append(await _submit(http, url, "bench-a", payload))

        started = time.monotonic()
        await asyncio.gather(*(submitter() for _ in range(min(o.jobs, o.clients))))
        log.print(f"bench: {o.jobs} jobs of tenant-a queued in {time.monotonic() - started:.1f} s")
        late = await _submit(http, url, "bench-b", payload)
        deadline = time.monotonic() + 60 + o.jobs * o.duration_s
        while (job := await _job(http, url, "bench-b", late))["status"] != "completed":
            if time.monotonic() > deadline:
                raise BenchError("tenant-b's job did not finish")
            await asyncio.sleep(0.05)
        sample = [await _job(http, url, "bench-a", i) for i in burst[:50]]
    slots = [j["finished_at"] - j["started_at"] for j in sample if j.get("finished_at")]
    slot = pct(slots, 0.5)
    wait = job["started_at"] - job["created_at"]
    return {"b_wait_s": round(wait, 3), "slot_s": slot, "b_wait_slots": ratio(wait, slot)}


def fairness(o: Options, log: Console) -> dict[str, Any]:
    """The burst with fair share on, then off (first in, first out)."""
    out: dict[str, Any] = {"jobs": o.jobs, "workers": o.workers}
    for fair in (True, False):
        with _stack(o, fair, log) as url:
            out["fair" if fair else "fifo"] = asyncio.run(_burst_then_one(url, o, log))
    return out
