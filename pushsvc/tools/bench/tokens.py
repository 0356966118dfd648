"""The model-token path under load, shared by ``pushsvc bench token-latency`` and
``workers``: a stack with a paced model server that stamps every token with its write
time (fakeask ``[[stamp]]``), and SSE watchers that compare each stamp with their clock.

A run queues its ``generate`` jobs with no worker up, opens every watcher (each gets the
job's empty snapshot), then starts the worker: every token is then seen live, never from
a replayed snapshot. Same machine, same clock: write -> receive needs no clock sync.
The watchers are light_sse's raw-socket readers, so the load generator costs little
beside what it measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]
from rich.console import Console

from ..fakeask import stamps
from ..procs import spawn, stop_all
from .clients import TERMINAL, until
from .light_sse import OnEvent, read_events
from .load import pct
from .stack import OFFLINE_MODEL, BenchError, private

MODEL = OFFLINE_MODEL
SAMPLE_S = 0.5  # how often CPU is sampled
LAG_TICK_S = 0.01  # the load generator's own loop-lag probe
MODEL_TOKENS_PER_S = 8000  # tokens/s one fake-llm process is asked for, at most
RATE_SPREAD = 0.2  # job i's model runs at rate * (0.9 .. 1.1): no lock-step bursts
COUNTED = TERMINAL | {"snapshot", "output"}  # the event kinds a watcher looks into


@dataclass
class TokenPath:
    """Every stamped token a watcher received: write -> receive (``total``), and, once per
    job (its first watcher), write -> the worker's publish (the event's ``ts``)."""

    ids: frozenset[str]  # this run's jobs (an all-jobs stream shows older ones too)
    total: list[float] = field(default_factory=list)
    to_publish: list[float] = field(default_factory=list)
    written: list[float] = field(default_factory=list)  # write times, once per job
    first: dict[str, float] = field(default_factory=dict)  # each job's first write
    last: dict[str, float] = field(default_factory=dict)  # and its last one
    ended: set[str] = field(default_factory=set)
    replayed: int = 0  # stamps seen in a snapshot (should be 0: watchers open first)

    def watcher(self, first: bool, job: str | None) -> OnEvent:
        """An ``on_event`` for ``light_sse.read_events``. ``job``: a per-job stream's job
        (None: the all-jobs stream, where each event's JSON names it); ``first``: the job's
        first watcher, which also counts the job's tokens and their publish times.

        Only what is counted is parsed: an output's stamps are found in its raw JSON text
        (a stamp holds nothing JSON escapes), its ``ts`` is read by the first watcher only.
        """

        def on_event(kind: str, text: str) -> None:
            if kind not in COUNTED:
                return  # progress, status: nothing to count
            now = time.time()
            data: dict[str, Any] | None = None
            if job is None:
                data = json.loads(text)
                this = str(data["job_id"])
                if this not in self.ids:
                    return
            else:
                this = job
            if kind == "output":
                self._tokens(this, text, now, first)
            elif kind == "snapshot":
                data = data or json.loads(text)
                self.replayed += len(stamps(str(data.get("output") or "")))
            else:
                self.ended.add(this)

        return on_event

    def _tokens(self, job: str, text: str, now: float, first: bool) -> None:
        marks = stamps(text)
        self.total.extend(now - stamp for stamp in marks)
        if first and marks:
            ts = json.loads(text)["ts"]
            self.to_publish.extend(ts - stamp for stamp in marks)
            self.written.extend(marks)
            self.first.setdefault(job, marks[0])
            self.last[job] = marks[-1]

    def steady(self) -> tuple[float, float] | None:
        """From when every job was streaming to when the first one stopped (0.5 s in)."""
        if not self.first:
            return None
        start, end = max(self.first.values()) + 0.5, min(self.last.values()) - 0.5
        return (start, end) if end > start else None

    def figures(self) -> dict[str, Any]:
        ms = [t * 1000 for t in self.total]
        pub = [t * 1000 for t in self.to_publish]
        return {
            "tokens": len(self.written),
            "token_deliveries": len(ms),
            "p50_ms": pct(ms, 0.5),
            "p99_ms": pct(ms, 0.99),
            "max_ms": max(ms, default=None),
            "to_publish_p50_ms": pct(pub, 0.5),
            "to_publish_p99_ms": pct(pub, 0.99),
            "replayed_stamps": self.replayed,
        }

    def written_between(self, start: float, end: float) -> int:
        return sum(start <= t < end for t in self.written)


class LoopLag:
    """How late the load generator's own loop wakes up: its lateness inflates every
    latency it measures, so the bench reports it beside them."""

    def __init__(self) -> None:
        self.lags: list[float] = []

    async def run(self) -> None:
        while True:
            began = time.monotonic()
            await asyncio.sleep(LAG_TICK_S)
            self.lags.append(time.monotonic() - began - LAG_TICK_S)

    def figures(self) -> dict[str, Any]:
        ms = [t * 1000 for t in self.lags]
        return {"loop_lag_p99_ms": pct(ms, 0.99), "loop_lag_max_ms": max(ms, default=None)}


@dataclass
class CpuSamples:
    """(epoch s, CPU seconds) of each named process, every SAMPLE_S."""

    pids: dict[str, list[int]]
    rows: list[tuple[float, dict[str, float]]] = field(default_factory=list)

    def take(self) -> None:
        times = psutil.cpu_times()
        cpu = {"machine": sum(times) - times.idle - getattr(times, "iowait", 0.0)}
        for name, pids in self.pids.items():
            with contextlib.suppress(psutil.Error):
                cpu[name] = sum(sum(psutil.Process(p).cpu_times()[:2]) for p in pids)
        self.rows.append((time.time(), cpu))

    async def run(self) -> None:
        while True:
            self.take()
            await asyncio.sleep(SAMPLE_S)

    def window(self, start: float, end: float) -> tuple[float, float, dict[str, float]] | None:
        """(from, to, CPU seconds per name) between the first sample at or after ``start``
        and the last at or before ``end``; None when they are too close. ``machine``: every
        process's, so ``others`` (machine minus ours) says how noisy the box was."""
        inside = [r for r in self.rows if start <= r[0] <= end]
        if len(inside) < 2:
            return None
        (t0, a), (t1, b) = inside[0], inside[-1]
        used = {k: b[k] - a[k] for k in b if k in a}
        used["others"] = used["machine"] - sum(v for k, v in used.items() if k != "machine")
        return t0, t1, used


@dataclass
class ModelStack:
    """Redis, the model server(s) and one API; workers come and go per run."""

    api: str
    env: dict[str, str]
    workdir: str
    pids: dict[str, list[int]]  # model, api, redis


@contextlib.contextmanager
def model_stack(log: Console, models: int, concurrency: int) -> Iterator[ModelStack]:
    """A private Redis, ``models`` fake-llm processes sharing one port (SO_REUSEPORT) and
    one API; workers (PUSHSVC_WORKER_CONCURRENCY ``concurrency``) start per run."""
    with private("token-path") as own:
        model, model_pids = own.model(["--tokens-per-s", "50"], models)
        env = own.model_env(model, worker_concurrency=str(concurrency))
        # The bench default (stack_env) publishes every step; the token path is measured
        # with the service's own throttle: PUSHSVC_PUBLISH_RATE_HZ as the caller has it.
        env.pop("PUSHSVC_PUBLISH_RATE_HZ")
        url, api = own.api(env)
        log.print(f"bench: Redis :{own.redis.port}, API {url}, {models} model process(es)")
        pids = {"model": model_pids, "api": [api.pid], "redis": []}
        if own.redis.proc is not None:
            pids["redis"].append(own.redis.proc.pid)
        yield ModelStack(url, env, own.workdir, pids)


@dataclass
class Load:
    """One run: ``jobs`` generate jobs of ``tokens`` tokens at about ``rate`` tokens/s;
    ``per_job`` watchers on each job's stream, or (0) one stream of all jobs."""

    jobs: int
    rate: float
    tokens: int
    per_job: int


@dataclass
class Run:
    """One run's measurements."""

    path: TokenPath
    lag: LoopLag
    cpu: CpuSamples
    outcomes: dict[str, int] = field(default_factory=dict)


def models_for(load: Load) -> int:
    """How many model processes ``load`` needs, so the model is not the bottleneck."""
    return max(1, math.ceil(load.jobs * load.rate / MODEL_TOKENS_PER_S))


def prompt(i: int, rate: float, jobs: int, tokens: int) -> str:
    spread = 1 - RATE_SPREAD / 2 + RATE_SPREAD * i / max(1, jobs)
    return f"[[stamp]] [[rate:{rate * spread:.3f}]] [[tokens:{tokens}]] bench job {i}"


async def _submit(http: httpx.AsyncClient, api: str, load: Load) -> list[str]:
    ids = []
    for i in range(load.jobs):
        payload = {
            "prompt": prompt(i, load.rate, load.jobs, load.tokens),
            "max_tokens": load.tokens,
        }
        resp = await http.post(f"{api}/v1/jobs", json={"type": "generate", "payload": payload})
        if resp.status_code != 202:
            raise BenchError(f"POST /v1/jobs answered {resp.status_code}: {resp.text[:300]}")
        ids.append(str(resp.json()["id"]))
    return ids


async def _outcomes(http: httpx.AsyncClient, api: str, ids: list[str]) -> dict[str, int]:
    states = [(await http.get(f"{api}/v1/jobs/{j}")).json()["status"] for j in ids]
    return {s: states.count(s) for s in sorted(set(states))}


def _watchers(
    api: str, ids: list[str], load: Load, path: TokenPath, opened: Callable[[], None]
) -> list[Coroutine[Any, Any, None]]:
    if load.per_job == 0:
        return [read_events(f"{api}/v1/events", path.watcher(True, None), opened)]
    return [
        read_events(f"{api}/v1/jobs/{job}/events", path.watcher(w == 0, job), opened)
        for job in ids
        for w in range(load.per_job)
    ]


def _live(tasks: list[asyncio.Task[None]], done: bool) -> bool:
    """``done``, unless a watcher failed: then raise what it failed with."""
    for task in tasks:
        if task.done() and not task.cancelled() and (exc := task.exception()) is not None:
            raise BenchError(f"a watcher failed: {exc!r}") from exc
    return done


async def run_jobs(stack: ModelStack, load: Load, log: Console) -> Run:
    """Queue the jobs, open the watchers, start a worker, wait for every job to end."""
    async with httpx.AsyncClient(timeout=30) as http:
        ids = await _submit(http, stack.api, load)
        run = Run(TokenPath(frozenset(ids)), LoopLag(), CpuSamples(dict(stack.pids)))
        opened: list[None] = []
        watchers = _watchers(stack.api, ids, load, run.path, lambda: opened.append(None))
        tasks = [asyncio.create_task(w) for w in watchers]
        probes: list[asyncio.Task[None]] = []
        worker = None
        try:
            await until(
                lambda: _live(tasks, len(opened) == len(tasks)), 60, f"{len(tasks)} watchers open"
            )
            worker = spawn(["worker"], stack.env, Path(stack.workdir, f"worker-{load.jobs}.log"))
            run.cpu.pids.update(worker=[worker.pid], bench=[os.getpid()])
            probes = [asyncio.create_task(run.cpu.run()), asyncio.create_task(run.lag.run())]
            log.print(f"bench: {load.jobs} jobs, {len(tasks)} watchers, worker started")
            expected = load.tokens / load.rate / (1 - RATE_SPREAD / 2)
            ended = run.path.ended
            await until(
                lambda: _live(tasks, len(ended) == load.jobs),
                expected * 3 + 60,
                "every job ending",
            )
            run.outcomes = await _outcomes(http, stack.api, ids)
        finally:
            for task in [*probes, *tasks]:
                task.cancel()
            await asyncio.gather(*probes, *tasks, return_exceptions=True)
            if worker is not None:
                stop_all([worker])
    return run


def steady_figures(run: Run, load: Load) -> dict[str, Any]:
    """CPU per token and cores used while every job streamed; when the jobs never all
    streamed at once (a worker too far behind), over the whole run instead (``window``)."""
    steady = run.path.steady()
    window = run.cpu.window(*steady) if steady else None
    kind = "steady"
    if window is None and len(run.cpu.rows) >= 2:
        window, kind = run.cpu.window(run.cpu.rows[0][0], run.cpu.rows[-1][0]), "whole run"
    if window is None:
        return {"window": None}
    t0, t1, used = window
    tokens = run.path.written_between(t0, t1)
    per_token = {
        f"{k}_us_per_token": used[k] / tokens * 1e6 if tokens else None
        for k in ("worker", "model", "api")
    }
    cores = {f"{k}_cores": v / (t1 - t0) for k, v in sorted(used.items())}
    return {
        "window": kind,
        "window_s": t1 - t0,
        "tokens_per_s": tokens / (t1 - t0),
        "tokens_per_s_asked": load.jobs * load.rate,
        **per_token,
        **cores,
    }
