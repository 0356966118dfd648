"""One golden fixture, both clients: ``tests/golden/events.json`` holds event sequences
and the job a client must hold after them; the Python client's ``apply_event`` and
pushsvc.js's ``applyEvent`` (in real Chromium) each run every case. Then real jobs on
real API and worker processes: what each client makes of a job's events ends equal to
what ``GET /v1/jobs/{id}`` shows after them, for every field of the snapshot.

Also defines ``golden``, a job type that writes text and fails as asked; the worker
loads it via PUSHSVC_JOB_MODULES.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page
from pydantic import BaseModel, Field

from pushsvc.client import Client, apply_event
from pushsvc.errors import JobError
from pushsvc.jobs import JobContext, job_type
from pushsvc.models import JobSnapshot

from .browser import serve_web
from .conftest import stack_env
from .procs import Api, Proc, RedisServer

GOLDEN = Path(__file__).parent / "golden" / "events.json"
CASES: list[dict[str, Any]] = json.loads(GOLDEN.read_text())["cases"]
KEY = "key-a"


def fold(events: list[list[Any]]) -> dict[str, Any]:
    job: dict[str, Any] = {}
    for kind, data in events:
        job = apply_event(job, kind, data)
    return job


def browser_fold(page: Page, sequences: list[list[list[Any]]]) -> list[dict[str, Any]]:
    """Each sequence of events folded by pushsvc.js's ``applyEvent``, in Chromium."""
    serve_web(page)
    jobs: list[dict[str, Any]] = page.evaluate(
        """async (sequences) => {
          const { applyEvent } = await import("/static/pushsvc.js");
          return sequences.map((events) =>
            events.reduce((job, [kind, data]) => applyEvent(job, kind, data), {}));
        }""",
        sequences,
    )
    return jobs


# ---- the fixture, in each client ----


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_python_client_applies_the_golden_case(case: dict[str, Any]) -> None:
    assert fold(case["events"]) == case["expect"], case["why"]


def test_browser_client_applies_every_golden_case(page: Page) -> None:
    got = browser_fold(page, [case["events"] for case in CASES])
    wrong = {
        case["name"]: {"got": job, "expect": case["expect"]}
        for case, job in zip(CASES, got, strict=True)
        if job != case["expect"]
    }
    assert not wrong, json.dumps(wrong, indent=1)


# ---- against the server: the snapshot after the same events ----


class GoldenPayload(BaseModel):
    words: int = Field(3, ge=1, le=1000)
    interval_ms: int = Field(0, ge=0, le=1000)
    fail_attempts: int = Field(0, ge=0, description="attempts that fail (retryable)")
    fail_first: bool = Field(False, description="fail those attempts before writing text")
    fatal: bool = Field(False, description="fail for good at the end, keeping the text")


@job_type("golden", payload=GoldenPayload, max_attempts=3)
async def golden(ctx: JobContext, payload: GoldenPayload) -> dict[str, str]:
    """Writes numbered words with progress; fails as asked (before or after the text)."""
    failing = ctx.attempt <= payload.fail_attempts
    if failing and payload.fail_first:
        raise JobError("asked to fail first", code="golden_retry", retryable=True)
    text = ""
    for i in range(payload.words):
        await asyncio.sleep(payload.interval_ms / 1000)
        word = f"a{ctx.attempt}w{i} "
        text += word
        await ctx.output(word)
        await ctx.progress(100 * (i + 1) / payload.words, "writing", f"word {i + 1}")
    if failing:
        raise JobError("asked to fail after writing", code="golden_retry", retryable=True)
    if payload.fatal:
        raise JobError("asked to fail for good", code="golden_fatal", result={"text": text})
    return {"text": text}


@pytest.fixture(scope="module")
def golden_api(redis_server: RedisServer) -> Iterator[Api]:
    env = stack_env(redis_server.url, f"g{secrets.token_hex(3)}")
    env["PUSHSVC_JOB_MODULES"] = "tests.jobtypes,tests.test_golden"
    worker = Proc(["worker"], env).start()
    api = Api([], env).start()
    try:
        yield api
    finally:
        api.stop()
        worker.stop()


RUNS: dict[str, dict[str, Any]] = {
    "completed": {"words": 4},
    "retried_after_text": {"words": 3, "fail_attempts": 1},  # the next attempt: a snapshot
    "retried_before_text": {"words": 2, "fail_attempts": 1, "fail_first": True},  # a status
    "failed_with_a_partial_result": {"words": 2, "fatal": True},
    "cancelled_while_running": {"words": 400, "interval_ms": 25},
}
TIMES = ("started_at", "finished_at")  # stamped as published: the event's ts, within 1 s


async def run_and_follow(
    url: str, payload: dict[str, Any]
) -> tuple[list[list[Any]], dict[str, Any]]:
    """Submit, follow to the end (cancel a long job at its first progress), and GET."""
    async with Client(url, KEY) as client:
        job = await client.submit("golden", payload)
        events: list[list[Any]] = []
        cancel = payload["words"] > 100
        async with asyncio.timeout(30):
            async for event in client.follow(job["id"]):
                events.append([event.kind, event.data])
                if event.kind == "progress" and cancel:
                    cancel = False
                    await client.cancel(job["id"])
        return events, await client.get(job["id"])


def differences(job: dict[str, Any], server: dict[str, Any]) -> list[str]:
    """The snapshot's fields (but the epoch, which no event carries) that differ."""
    wrong = []
    for name in JobSnapshot.model_fields:
        mine, theirs = job.get(name), server[name]
        if name in TIMES and mine is not None and theirs is not None:
            same = abs(mine - theirs) < 1.0
        else:
            same = name == "epoch" or mine == theirs
        if not same:
            wrong.append(f"{name}: client {mine!r}, server {theirs!r}")
    return wrong


@pytest.mark.timeout(120)
def test_both_clients_end_where_the_servers_snapshot_is(golden_api: Api, page: Page) -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        runs = {
            name: pool.submit(asyncio.run, run_and_follow(golden_api.url, payload)).result(60)
            for name, payload in RUNS.items()
        }
    status = {name: server["status"] for name, (_, server) in runs.items()}
    assert status == {
        "completed": "completed",
        "retried_after_text": "completed",
        "retried_before_text": "completed",
        "failed_with_a_partial_result": "failed",
        "cancelled_while_running": "cancelled",
    }
    boundary = [kind for kind, _ in runs["retried_after_text"][0]]
    assert boundary.count("snapshot") == 2, boundary  # the first, and attempt 2's
    in_browser = browser_fold(page, [events for events, _ in runs.values()])
    for (name, (events, server)), js_job in zip(runs.items(), in_browser, strict=True):
        assert differences(fold(events), server) == [], (name, "python", events)
        assert differences(js_job, server) == [], (name, "pushsvc.js", events)
