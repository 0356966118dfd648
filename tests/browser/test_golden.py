"""One golden fixture, both clients: ``tests/golden/events.json`` holds event sequences
and the job a client must hold after them; pushsvc.js's ``applyEvent`` (in real Chromium)
runs every case (the Python client's ``apply_event``: tests/test_job_view.py). Then real
jobs on real API and worker processes: what each client makes of a job's events ends
equal to what ``GET /v1/jobs/{id}`` shows after them, for every field of the snapshot.
The ``golden`` job type (tests/golden/__init__.py) writes text and fails as asked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Page

from pushsvc.client import Client
from pushsvc.models import JobSnapshot

from ..conftest import stack_env
from ..golden import CASES, fold
from ..procs import Api, Proc, RedisServer
from .conftest import serve_web

KEY = "key-a"


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


def test_browser_client_applies_every_golden_case(page: Page) -> None:
    got = browser_fold(page, [case["events"] for case in CASES])
    wrong = {
        case["name"]: {"got": job, "expect": case["expect"]}
        for case, job in zip(CASES, got, strict=True)
        if job != case["expect"]
    }
    assert not wrong, json.dumps(wrong, indent=1)


# ---- against the server: the snapshot after the same events ----


@pytest.fixture(scope="module")
def golden_api(redis_server: RedisServer) -> Iterator[Api]:
    env = stack_env(redis_server.url, f"g{secrets.token_hex(3)}")
    env["PUSHSVC_JOB_MODULES"] = "tests.jobtypes,tests.golden"
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
