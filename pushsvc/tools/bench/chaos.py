"""``pushsvc bench chaos``: for N minutes jobs stream to watchers of every kind while
faults hit the stack (``faults``); then every job and every watcher is checked
(``check``). The exit status is 1 when anything was violated.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
from rich.console import Console
from rich.table import Table

from ..fakeask import answer, read_ask
from .check import Context, Outcome, Violation, check_run
from .clients import PER_CLIENT, TERMINAL, Clients, http_client
from .faults import CLUSTER_FAULTS, FAULTS, TENANTS, ChaosStack, Injected, chaos_stack, inject
from .invariants import WatchLog
from .stack import BenchError
from .watchers import Api, StreamWatcher, poll_job

MODEL_RATE = 10  # tokens a second the model writes for a ``generate`` job
MAX_TOKENS = 512  # the generate payload's limit, sent explicitly: the fake cuts at it
TICK_MS = 500  # a ticker's step
CUT_S = (0.5, 3.0)  # how long the resuming client stays on one connection
SUBMIT_TRIES_S = 30.0  # a submission is retried (same Idempotency-Key) this long


@dataclass(frozen=True)
class Plan:
    """The run's shape. ``faults``: kinds to inject, cycled in shuffled rounds so each
    comes once before any comes twice (empty: every registered kind); ``gap_s``: quiet
    time between two faults; ``settle_s``: how long jobs get to end once faults stop;
    ``hang_s``: how long after its jobs ended a stream or poller may take to stop."""

    minutes: float
    faults: tuple[str, ...] = ()
    gap_s: tuple[float, float] = (4.0, 10.0)
    submit_s: tuple[float, float] = (1.0, 2.5)
    job_s: tuple[float, float] = (5.0, 15.0)
    group: int = 3  # jobs per named multiplexed stream
    lease_s: float = 3.0
    settle_s: float = 120.0
    hang_s: float = 20.0
    seed: int | None = None


@dataclass
class Job:
    id: str
    tenant: str
    type: str
    expected: str | None  # the model's full text (generate)
    poller: WatchLog


def model_text(prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    """The fake model's whole answer to ``prompt``. It is deterministic: its words are
    drawn from a hash of the prompt without its directives, so the same functions the
    server runs give the text here, without asking it."""
    body = {
        "model": "fake-1",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
    }
    pieces, _ = answer(read_ask(body, None, 0.0), malformed=False)
    return "".join(pieces)


def job_body(i: int, rng: random.Random, plan: Plan) -> tuple[dict[str, Any], str | None]:
    """A ``generate`` or a ``ticker`` job of ``plan.job_s`` seconds, and its model text."""
    seconds = rng.uniform(*plan.job_s)
    if rng.random() < 0.5:
        tokens = max(1, round(seconds * MODEL_RATE))
        prompt = f"chaos job {i}: tell of tides [[tokens:{tokens}]] [[rate:{MODEL_RATE}]]"
        payload = {"prompt": prompt, "max_tokens": MAX_TOKENS, "expected_tokens": tokens}
        return {"type": "generate", "payload": payload}, model_text(prompt)
    steps = max(1, round(seconds * 1000 / TICK_MS))
    return {"type": "ticker", "payload": {"steps": steps, "interval_ms": TICK_MS}}, None


class ChaosRun:
    """One run against a stack: the submitter, the fault loop, the watchers, the end."""

    def __init__(self, stack: ChaosStack, plan: Plan, log: Console) -> None:
        self.stack, self.plan, self.log = stack, plan, log
        self.rng = random.Random(plan.seed)
        self.apis = {t: Api(stack.urls, stack.keys[t]) for t in TENANTS}
        self.http = http_client()  # submissions, polls and the final reads
        self.clients = Clients(PER_CLIENT)  # the streams
        self.jobs: list[Job] = []
        self.logs: list[WatchLog] = []
        self.all_logs: dict[str, WatchLog] = {}
        self.groups: dict[str, list[Job]] = {t: [] for t in TENANTS}
        self.streams: list[asyncio.Task[None]] = []
        self.pollers: list[asyncio.Task[None]] = []
        self.forever: list[asyncio.Task[None]] = []
        self.faults: list[Injected] = []
        self.problems: list[Violation] = []  # found while running
        self.started = time.time()

    async def run(self) -> dict[str, Any]:
        async with self.http, self.clients:
            try:
                await self._open_all_jobs_streams()
                await self._chaos(time.monotonic() + self.plan.minutes * 60)
                for tenant in TENANTS:
                    self._named(tenant)
                self.log.print(f"chaos: {len(self.jobs)} jobs submitted; faults over")
                await self._settle()
            finally:
                tasks = self.streams + self.pollers + self.forever
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            until = time.monotonic() + self.plan.settle_s
            outcomes = {job.id: await self._outcome(job, until) for job in self.jobs}
        return self._result(outcomes)

    # -- watchers -------------------------------------------------------------------

    def _stream(self, log: WatchLog, tenant: str, path: str, **how: Any) -> StreamWatcher:
        watcher = StreamWatcher(
            log, self.clients[len(self.logs)], self.apis[tenant], path, self.rng, **how
        )
        self.logs.append(log)
        task = asyncio.create_task(watcher.run())
        (self.forever if how.get("forever") else self.streams).append(task)
        return watcher

    async def _open_all_jobs_streams(self) -> None:
        opened = []
        for i, tenant in enumerate(TENANTS):
            self.all_logs[tenant] = log = WatchLog(f"all {tenant}", "all", [])
            home = i % len(self.stack.urls)
            opened.append(self._stream(log, tenant, "/v1/events", home=home, forever=True).opened)
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), 30)
        except TimeoutError:
            raise BenchError("the all-jobs streams did not open in 30 s") from None

    def _watch(self, job: Job, i: int) -> None:
        short, path = job.id[:8], f"/v1/jobs/{job.id}/events"
        home = i % len(self.stack.urls)
        self._stream(WatchLog(f"job {short}", "job", [job.id]), job.tenant, path, home=home)
        resumer = WatchLog(f"resume {short}", "resume", [job.id])
        self._stream(resumer, job.tenant, path, roam=True, cut_s=CUT_S)
        self.logs.append(job.poller)
        poll = poll_job(job.poller, self.http, self.apis[job.tenant], job.id, self.rng)
        self.pollers.append(asyncio.create_task(poll))
        self.groups[job.tenant].append(job)
        if len(self.groups[job.tenant]) >= self.plan.group:
            self._named(job.tenant)

    def _named(self, tenant: str) -> None:
        group, self.groups[tenant] = self.groups[tenant], []
        if group:
            ids = [j.id for j in group]
            name = f"named {sum(log.kind == 'named' for log in self.logs)}"
            path = "/v1/events?" + "&".join(f"job={j}" for j in ids)
            home = self.rng.randrange(len(self.stack.urls))
            self._stream(WatchLog(name, "named", ids), tenant, path, home=home)

    # -- load and faults ----------------------------------------------------------------

    async def _chaos(self, until: float) -> None:
        """Submit and inject faults until ``until``; either failing stops both."""
        tasks = [
            asyncio.create_task(self._submitting(until)),
            asyncio.create_task(self._faulting(until)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in tasks:
                if task.done():
                    task.result()  # raises what went wrong
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _submitting(self, until: float) -> None:
        i = 0
        while time.monotonic() < until:
            tenant = self.rng.choice(TENANTS)
            body, expected = job_body(i, self.rng, self.plan)
            job_id = await self._post(tenant, body)
            if job_id is None:
                detail = f"job {i}: no answer but 5xx or refusals for {SUBMIT_TRIES_S:g} s"
                self.problems.append(Violation("submit_failed", "submitter", "", detail))
            else:
                poller = WatchLog(f"poll {job_id[:8]}", "poll", [job_id])
                job = Job(job_id, tenant, body["type"], expected, poller)
                self.jobs.append(job)
                self.all_logs[tenant].jobs.append(job_id)
                self._watch(job, i)
            i += 1
            await asyncio.sleep(self.rng.uniform(*self.plan.submit_s))

    async def _post(self, tenant: str, body: dict[str, Any]) -> str | None:
        """Submit until a 202, with one Idempotency-Key: a retry after a lost answer
        gets the same job instead of a second one we would not know of."""
        api = self.apis[tenant]
        headers = {**api.headers, "Idempotency-Key": uuid.uuid4().hex}
        deadline = time.monotonic() + SUBMIT_TRIES_S
        while time.monotonic() < deadline:
            url = self.rng.choice(api.urls)
            try:
                resp = await self.http.post(f"{url}/v1/jobs", json=body, headers=headers)
            except httpx.HTTPError:
                resp = None  # that API is down, or went down mid-request
            if resp is not None and resp.status_code == 202:
                return str(resp.json()["id"])
            if resp is not None and resp.status_code < 500 and resp.status_code != 429:
                raise BenchError(f"POST /v1/jobs answered {resp.status_code}: {resp.text[:300]}")
            await asyncio.sleep(0.5)
        return None

    async def _faulting(self, until: float) -> None:
        kinds, round_ = list(self.plan.faults or FAULTS), list[str]()
        await asyncio.sleep(self.rng.uniform(*self.plan.gap_s))
        while time.monotonic() < until:
            round_ = round_ or self.rng.sample(kinds, len(kinds))
            done = await inject(round_.pop(0), self.stack, self.rng)
            self.faults.append(done)
            self.log.print(f"chaos: {done.kind}: {done.detail} ({done.took_s:.1f} s)")
            quiet = self.rng.uniform(*self.plan.gap_s)
            await asyncio.sleep(max(0.0, min(quiet, until - time.monotonic())))

    # -- the end --------------------------------------------------------------------------

    async def _settle(self) -> None:
        """Every job gets ``settle_s`` to end (its poller stops then); streams get
        ``hang_s`` more; the all-jobs streams, until each saw its jobs end."""
        if self.pollers:
            await asyncio.wait(self.pollers, timeout=self.plan.settle_s)
        if self.streams:
            await asyncio.wait(self.streams, timeout=self.plan.hang_s)
        deadline = time.monotonic() + self.plan.hang_s
        while time.monotonic() < deadline and not self._all_jobs_streams_caught_up():
            await asyncio.sleep(0.5)

    def _all_jobs_streams_caught_up(self) -> bool:
        for log in self.all_logs.values():
            ended = {e.data.get("job_id") for e in log.events if e.kind in TERMINAL}
            if not set(log.jobs) <= ended:
                return False
        return True

    async def _outcome(self, job: Job, until: float) -> Outcome:
        """The job's final snapshot (None: 404), read once it ended, or at ``until``. A
        job whose end a Redis loss took back runs again after its watchers stopped."""
        api = self.apis[job.tenant]
        deadline, tries = time.monotonic() + 30, 0
        while True:
            url = api.urls[tries % len(api.urls)]
            tries += 1
            try:
                resp = await self.http.get(f"{url}/v1/jobs/{job.id}", headers=api.headers)
                over = resp.status_code == 404 or (
                    resp.status_code == 200 and resp.json()["status"] in TERMINAL
                )
                if over or (resp.status_code == 200 and time.monotonic() > until):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > max(deadline, until):
                raise BenchError(f"GET /v1/jobs/{job.id} gave no answer in 30 s")
            await asyncio.sleep(0.5)
        final = resp.json() if resp.status_code == 200 else None
        ended = (final or {}).get("finished_at") or job.poller.done_at
        return Outcome(job.id, final, job.expected, ended)

    def _result(self, outcomes: dict[str, Outcome]) -> dict[str, Any]:
        losses = [f.lost for f in self.faults if f.lost is not None]
        ctx = Context(outcomes, losses, self.plan.hang_s)
        crashed = [Violation("process_exited", "stack", "", p) for p in self.stack.exited()]
        checked = check_run(self.logs, ctx, [*self.problems, *crashed])
        ends = Counter((o.final or {}).get("status", "lost (404)") for o in outcomes.values())
        return {
            "faults": dict(Counter(f.kind for f in self.faults)),
            "fault_log": [
                {
                    "kind": f.kind,
                    "at_s": round(f.at - self.started, 1),
                    "took_s": round(f.took_s, 1),
                    "detail": f.detail,
                }
                for f in self.faults
            ],
            "jobs": len(self.jobs),
            "job_types": dict(Counter(j.type for j in self.jobs)),
            "job_ends": dict(ends),
            "watchers": len(self.logs),
            "events_checked": checked.events,
            "superseded_views": checked.superseded,
            "violations": [asdict(v) for v in checked.violations],
        }

    def keep_watchers(self, violations: list[dict[str, Any]], path: Path) -> None:
        """What the watchers named in ``violations`` saw (and the faults' times), as JSON
        beside the processes' logs: what it takes to tell why."""
        named = {v["watcher"] for v in violations}
        kept = [asdict(log) for log in self.logs if log.name in named]
        faults = [asdict(f) for f in self.faults]
        path.write_text(json.dumps({"started": self.started, "faults": faults, "watchers": kept}))


# -- the command ------------------------------------------------------------------------


def run_chaos(plan: Plan, log: Console) -> dict[str, Any]:
    """A chaos run on its own stack; the stack's logs are kept when something broke."""
    unknown = set(plan.faults) - set(FAULTS)
    if unknown:
        raise BenchError(f"unknown fault kinds {sorted(unknown)}: known are {sorted(FAULTS)}")
    kinds = plan.faults or tuple(FAULTS)
    with chaos_stack(plan.lease_s, log, cluster=bool(set(kinds) & set(CLUSTER_FAULTS))) as stack:
        run = ChaosRun(stack, plan, log)
        result = asyncio.run(run.run())
        stack.keep = bool(result["violations"])
        if stack.keep:
            run.keep_watchers(result["violations"], stack.workdir / "watchers.json")
        logs = str(stack.workdir) if stack.keep else None
    head = {"scenario": "chaos", "stack": "own", "params": {"minutes": plan.minutes}}
    return {**head, **result, "logs": logs}


def render(result: dict[str, Any]) -> list[Table]:
    summary = Table(title="pushsvc bench chaos")
    summary.add_column("figure")
    summary.add_column("value", justify="right")
    for kind, n in sorted(result["faults"].items()):
        summary.add_row(f"faults: {kind}", str(n))
    summary.add_row("jobs", str(result["jobs"]))
    for name in ("job_types", "job_ends"):
        for key, n in sorted(result[name].items()):
            summary.add_row(f"{name.replace('_', ' ')}: {key}", str(n))
    for name in ("watchers", "events_checked", "superseded_views"):
        summary.add_row(name.replace("_", " "), f"{result[name]:,}")
    summary.add_row("violations", str(len(result["violations"])))
    tables = [summary]
    if result["violations"]:
        listed = Table(title="violations (one row per rule, watcher and job)")
        for column in ("rule", "watcher", "job", "detail", "times"):
            listed.add_column(column, overflow="fold")
        for v in result["violations"]:
            listed.add_row(v["rule"], v["watcher"], v["job"][:8], v["detail"], str(v["count"]))
        tables.append(listed)
    return tables


def chaos_command(minutes: float, urls: list[str] | None, as_json: bool, log: Console) -> int:
    """``pushsvc bench chaos``: 0 when every invariant held, 1 otherwise, 2 for bad input."""
    if urls is not None:
        log.print("pushsvc bench: chaos kills and restarts its own stack; it takes no --url")
        return 2
    try:
        result = run_chaos(Plan(minutes=minutes), log)
    except (BenchError, httpx.HTTPError, redis.RedisError, OSError) as exc:
        log.print(f"pushsvc bench chaos failed: {exc}", markup=False)
        return 1
    out = Console(stderr=as_json, width=200 if as_json else None)
    for table in render(result):
        out.print(table)
    if result["logs"]:
        out.print(f"the processes' logs: {result['logs']}", markup=False)
    if as_json:
        print(json.dumps(result), flush=True)
    return 1 if result["violations"] else 0
