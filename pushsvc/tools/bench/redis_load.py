"""The load processes of ``pushsvc bench redis-ceiling`` (redis_ceiling.py): each creates
and starts its share of the jobs as the API and a worker do (``JobStore.create``,
``transitions.start``), then publishes for them as a worker's flush does, through
``JobContext.apply`` of ``transitions.flush``: one call of the publish script
(``lua/publish_fn.lua``, real keys) with two events, the progress and the text since.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import random
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from ... import transitions
from ...context import JobContext
from ...data_plane import connect_data
from ...publish import Published, Writer
from ...queue import Queue, connect, new_arq_id
from ...settings import Settings
from ...store import JobStore
from .stack import BenchError

# A worker's flush (context.py): one publish call, two events in it (two seqs, two log
# entries, two PUBLISHes to each channel): the progress, then the output written since.
CALLS_PER_FLUSH = 1
EVENTS_PER_CALL = 2
FLAT_OUT_JOBS = 32  # jobs each load process publishes for without pause (rate 0)
POOL = 32  # Redis connections per load process (a blocking pool: a fixed number)
DELTA = " the quick brown fox jumps"  # a flush's text: ~6 tokens (50 tokens/s at 10 Hz)
TENANT = "bench"
ANSWER_S = 120.0  # a load process that has not answered by then is stuck
# Where the jobs' state lives and whose they are: the data cluster's nodes ('' for the
# queue's Redis) and the tenants the jobs take in turn.
Spread = tuple[str, tuple[str, ...]]
ONE_REDIS: Spread = ("", (TENANT,))


@dataclass(frozen=True)
class Step:
    """One step for one load process: its first ``jobs`` publish from ``start_at`` (epoch
    seconds) for ``duration_s``, ``rate`` flushes a second each (0: flat out)."""

    start_at: float
    duration_s: float
    jobs: int
    rate: float


async def _running_job(store: JobStore, tenant: str = TENANT) -> JobContext:
    """A job created as the API creates one and started as a worker starts it."""
    job_id = str(uuid.uuid4())
    arq_id = new_arq_id(job_id)
    fields: dict[str, Any] = {
        "id": job_id,
        "type": "generate",
        "status": "queued",
        "payload": {},
        "priority": "normal",
        "attempt": 1,
        "max_attempts": 1,
        "run": 1,
        "arq_id": arq_id,
        "created_at": time.time(),
        "output": "",
    }
    fields["tenant"] = tenant
    await store.create(tenant, fields, None)  # started below, without arq: not handed over
    change = transitions.start(fields, secrets.token_hex(6), time.time())
    writer = Writer(arq_id)
    started = await transitions.publish(store, job_id, tenant, change, writer=writer)
    if not isinstance(started, Published):
        raise BenchError(f"job {job_id} did not start: {started}")
    writer = Writer(arq_id, change.fields["owner"], started.position)
    return JobContext(store, fields, store.settings.publish_rate_hz, writer=writer)


async def _flush(ctx: JobContext, n: int, took: list[float]) -> None:
    """What a worker's flush sends: one call with the latest progress, then the text
    written since; its time goes to ``took``."""
    data = {"progress": min(99.0, n / 10), "stage": "answering", "message": None}
    data |= {"eta_s": None, "waiting": None, "llm": None}
    change = transitions.flush(data, DELTA)
    if change is None or 1 + (change.then is not None) != EVENTS_PER_CALL:
        raise BenchError(f"a flush is not one call of {EVENTS_PER_CALL} events: {change}")
    begun = time.perf_counter()
    reply = await ctx.apply(change)
    took.append(time.perf_counter() - begun)
    if not isinstance(reply, Published):
        raise BenchError(f"job {ctx.job_id}: the publish answered {reply}")


async def _publish_for(ctx: JobContext, step: Step, took: list[float]) -> None:
    end = step.start_at + step.duration_s
    if step.rate <= 0:  # flat out
        n = 0
        while time.time() < end:
            n += 1
            await _flush(ctx, n, took)
        return
    period = 1 / step.rate
    # Jobs start at random phases of the period, as streaming answers do.
    due = step.start_at + period * random.random()
    n = 0
    while due < end:
        await asyncio.sleep(max(0.0, due - time.time()))
        n += 1
        await _flush(ctx, n, took)
        due += period


async def _serve(
    conn: Connection, redis_url: str, namespace: str, jobs: int, spread: Spread
) -> None:
    data_cluster, tenants = spread
    settings = Settings.model_validate(
        {"redis_url": redis_url, "namespace": namespace, "data_cluster": data_cluster}
    )
    redis = connect(settings, max_connections=POOL)
    data = connect_data(settings, socket_timeout=10)
    try:
        queue = Queue(redis, settings)
        # As a worker's (batched), on the cluster when there is one.
        store = JobStore(redis if data is None else data, settings, batched=True, queue=queue)
        made = (_running_job(store, tenants[i % len(tenants)]) for i in range(jobs))
        ctxs = await asyncio.gather(*made)
        conn.send(("ok", [c.job_id for c in ctxs]))
        while (step := await asyncio.to_thread(conn.recv)) is not None:
            took: list[float] = []
            await asyncio.sleep(max(0.0, step.start_at - time.time()))
            await asyncio.gather(*(_publish_for(c, step, took) for c in ctxs[: step.jobs]))
            conn.send(("ok", took))
    finally:
        if data is not None:
            await data.close_all()
        await redis.aclose()


def load_process(
    conn: Connection, redis_url: str, namespace: str, jobs: int, spread: Spread
) -> None:
    """A load process's body (spawned): create and start ``jobs`` jobs, send their ids,
    then run each Step received and send back every publish call's time (s)."""
    try:
        asyncio.run(_serve(conn, redis_url, namespace, jobs, spread))
    except Exception as exc:  # the parent raises it as a BenchError
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


class Loads:
    """The load processes, spawned (each its own interpreter: none shares a GIL)."""

    def __init__(
        self, redis_url: str, namespace: str, shares: list[int], spread: Spread = ONE_REDIS
    ) -> None:
        spawn = multiprocessing.get_context("spawn")
        self.namespace, self.shares = namespace, shares
        self.job_ids: list[str] = []
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for jobs in shares:
            mine, theirs = spawn.Pipe()
            proc = spawn.Process(
                target=load_process,
                args=(theirs, redis_url, namespace, jobs, spread),
                daemon=True,
            )
            proc.start()
            theirs.close()  # so a dead load process reads as EOF here
            self.conns.append(mine)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int | None]:
        return [p.pid for p in self.procs]

    def answers(self) -> list[Any]:
        out = []
        for conn in self.conns:
            if not conn.poll(ANSWER_S):
                raise BenchError(f"a load process did not answer in {ANSWER_S:g} s")
            kind, body = conn.recv()
            if kind == "error":
                raise BenchError(f"a load process failed: {body}")
            out.append(body)
        return out

    def send(self, start_at: float, duration_s: float, jobs: int, rate: float) -> int:
        """Every load process its part of ``jobs`` (rate 0: up to ``FLAT_OUT_JOBS`` of its
        own, flat out); the jobs that publish."""
        parts = split(jobs, len(self.conns))
        if rate <= 0:
            parts = [min(FLAT_OUT_JOBS, share) for share in self.shares]
        for conn, part in zip(self.conns, parts, strict=True):
            conn.send(Step(start_at, duration_s, part, rate))
        return sum(parts)

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()


@contextlib.contextmanager
def load_processes(
    redis_url: str, namespace: str, jobs: int, count: int, spread: Spread = ONE_REDIS
) -> Iterator[Loads]:
    """``count`` load processes with ``jobs`` running jobs between them; stopped after."""
    loads = Loads(redis_url, namespace, split(jobs, count), spread)
    try:
        loads.job_ids = [i for ids in loads.answers() for i in ids]
        yield loads
    finally:
        loads.close()


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]
