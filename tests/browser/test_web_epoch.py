"""pushsvc.js in real Chromium across Redis faults: the console's cards (one multiplexed
stream) and ``watchJob``/``watchJobs`` on a page apply the ``reset`` snapshots and the
``failed``/``state_lost`` ends a Redis that lost history brings.

A private redis-server (``SnapshotRedis``, from scenarios/test_redis_loses_history.py) is
SAVEd mid-stream, killed with SIGKILL once the page showed text the RDB lacks, and started
again from that older RDB, or empty; the API and worker run on it, never on the shared
Redis. Every wait is for something the page shows or a watcher received, never for time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect
from playwright.sync_api import TimeoutError as PageTimeout

from ..conftest import model_answer
from ..procs import Api, Proc
from ..scenarios.test_redis_loses_history import SnapshotRedis
from ..scenarios.test_redis_outages import logs_on_failure
from .test_web import card, console_env, get_job

PROMPT = "[[tokens:170]] [[rate:25]] the lighthouse keeper's log"  # about 7 s of text
QUEUED = "[[tokens:5]] waits its turn"


@dataclass
class Faulty:
    server: SnapshotRedis
    env: dict[str, str]
    worker: Proc
    api: Api
    procs: list[Proc]
    model_url: str


@pytest.fixture
def faulty(model_url: str) -> Iterator[Faulty]:
    """An API and one worker on a private Redis that the test crashes: one job runs at a
    time (a second waits queued), a failed attempt waits 30 s for its retry (queued),
    short lease and grace, so recovery takes seconds."""
    server = SnapshotRedis()
    server.start()
    env = console_env(
        server.url,
        f"we{secrets.token_hex(3)}",
        llm_base_url=model_url,
        llm_api_key="offline",
        llm_model="fake-1",
        lease_s="3",
        heartbeat_s="1",
        state_lost_grace_s="3",
        worker_concurrency="1",
        retry_base_s="30",
    )
    # Stream links signed with one secret: a restarted API still takes them.
    env["PUSHSVC_SECRET"] = "test-secret-not-for-production"
    procs: list[Proc] = []
    try:
        worker = Proc(["worker"], env).start()
        procs.append(worker)
        api = Api([], env).start()
        procs.append(api)
        with logs_on_failure(procs):
            yield Faulty(server, env, worker, api, procs, model_url)
    finally:
        for proc in reversed(procs):
            proc.stop()
        server.stop()


def expected_text(model_url: str, prompt: str) -> str:
    """The model's whole answer, asked directly (outside Playwright's event loop)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, model_answer(model_url, prompt)).result(timeout=30)


def submitted(page: Page, before: int) -> str:
    page.get_by_role("button", name="Submit job").click()
    expect(page.locator(".card")).to_have_count(before + 1)
    job_id = page.locator(".card").first.get_attribute("data-job-id")
    assert job_id
    return job_id


def submit_generate(page: Page, prompt: str) -> str:
    """Submit a ``generate`` job from the console's form; the new card's job id."""
    expect(page.locator("#job-type")).to_be_enabled()
    page.select_option("#job-type", "generate")
    page.fill("#f-prompt", prompt)
    return submitted(page, page.locator(".card").count())


def submit_retrying(page: Page) -> str:
    """A ticker whose first attempt fails (retryable): it waits queued for attempt 2."""
    expect(page.locator("#job-type")).to_be_enabled()
    page.select_option("#job-type", "ticker")
    page.fill("#f-steps", "3")
    page.get_by_text("More options").click()
    page.fill("#f-fail_at_step", "1")
    page.fill("#f-fail_attempts", "1")
    page.check("#f-fail_retryable")
    job_id = submitted(page, page.locator(".card").count())
    expect(card(page, job_id).locator(".outcome")).to_contain_text("Attempt 1 failed")
    expect(card(page, job_id).locator(".badge")).to_have_text("queued")
    return job_id


# Every text a card's output showed, and what a watchJob() of the same job saw (used
# as README shows: the job's links.events, handlers called with (job, event)).
RECORD = """
async ([id]) => {
  window.shown = window.shown || {};
  const texts = (window.shown[id] = []);
  const pre = document.querySelector(`.card[data-job-id="${id}"] .output`);
  new MutationObserver(() => texts.push(pre.textContent)).observe(
    pre, {childList: true, characterData: true, subtree: true});

  const lib = await import("/static/pushsvc.js");
  const job = await lib.createClient().get(id);
  window.watched = window.watched || {};
  const got = (window.watched[id] = {events: [], modes: [], job: null, end: null});
  const handlers = {mode: (m) => got.modes.push(m)};
  for (const kind of ["snapshot", "status", "progress", "output", "done", "failed"]) {
    handlers[kind] = (job, ev) => {
      got.events.push([ev.kind, ev.seq, ev.reset === true, (job.output || "").length]);
      got.job = job;
      if (lib.isTerminal(ev.kind)) got.end = ev.kind;
    };
  }
  lib.watchJob(id, handlers, {eventsUrl: job.links.events, storageKey: false});
}
"""


def open_console(page: Page, url: str) -> None:
    """The console, with every toast it shows kept (they go away after 8 s)."""
    page.goto(url)
    page.evaluate(
        """() => {
            window.toasts = [];
            new MutationObserver((changes) => {
                for (const change of changes) {
                    for (const node of change.addedNodes) window.toasts.push(node.textContent);
                }
            }).observe(document.getElementById("toasts"), {childList: true});
        }"""
    )


def toasts(page: Page, text: str) -> list[str]:
    shown: list[str] = page.evaluate("() => window.toasts")
    return [t for t in shown if text in t]


def record(page: Page, job_id: str) -> None:
    page.evaluate(RECORD, [job_id])


def watched(page: Page, job_id: str) -> dict[str, Any]:
    got: dict[str, Any] = page.evaluate("([id]) => window.watched[id]", [job_id])
    return got


def shown_texts(page: Page, job_id: str) -> list[str]:
    texts: list[str] = page.evaluate("([id]) => window.shown[id]", [job_id])
    return texts


def card_text(page: Page, job_id: str) -> str:
    return card(page, job_id).locator(".output").text_content() or ""


def text_longer_than(page: Page, job_id: str, chars: int) -> None:
    page.wait_for_function(
        """([id, n]) => {
            const pre = document.querySelector(`.card[data-job-id="${id}"] .output`);
            return pre !== null && pre.textContent.length > n;
        }""",
        arg=[job_id, chars],
    )


def watcher_ended(page: Page, job_id: str) -> None:
    page.wait_for_function("([id]) => window.watched[id].end !== null", arg=[job_id])


def crash_mid_stream(
    page: Page, faulty: Faulty, job_id: str, *, wipe: bool, pause: bool = False
) -> dict[str, Any]:
    """SAVE while ``job_id`` streams, wait until the card shows text the RDB lacks, kill
    Redis and start it again (from that RDB, or empty). The job as it was at the SAVE.

    ``pause``: the worker is stopped across the restart, so the page first gets the
    RDB's state (a reset snapshot with a lower seq and less text) and must show it."""
    text_longer_than(page, job_id, 30)
    faulty.server.save()
    saved = get_job(faulty.api, job_id)  # at least what the RDB holds
    text_longer_than(page, job_id, len(saved["output"]) + 60)
    if pause:
        faulty.worker.signal(signal.SIGSTOP)
    try:
        seen = watched_past(page, job_id, len(saved["output"]) + 60)
        faulty.server.crash(wipe=wipe)
        faulty.server.start()
        if pause:
            show_the_rdb(page, faulty, job_id, seen)
    finally:
        if pause:
            faulty.worker.signal(signal.SIGCONT)
    return saved


def watched_past(page: Page, job_id: str, chars: int) -> dict[str, Any]:
    """The job as the watchJob() knows it, once it holds more than ``chars`` of text."""
    page.wait_for_function(
        "([id, n]) => (window.watched[id].job?.output || '').length > n", arg=[job_id, chars]
    )
    job: dict[str, Any] = watched(page, job_id)["job"]
    return job


def show_the_rdb(page: Page, faulty: Faulty, job_id: str, seen: dict[str, Any]) -> None:
    """The streams resync once their Redis connection is back: the RDB's job, marked
    reset, is older than what the page had (``seen``); the card and the watcher show it."""
    rdb = get_job(faulty.api, job_id)  # nobody rewrote it yet: the worker is stopped
    assert len(rdb["output"]) < len(seen["output"]) and rdb["seq"] < seen["seq"], (rdb, seen)
    page.wait_for_function(
        """([id, text]) => document.querySelector(
             `.card[data-job-id="${id}"] .output`).textContent === text""",
        arg=[job_id, rdb["output"]],
    )
    page.wait_for_function(
        "([id, seq]) => window.watched[id].job.seq === seq", arg=[job_id, rdb["seq"]]
    )
    assert watched(page, job_id)["job"]["output"] == rdb["output"]


def check_streamed_job(page: Page, faulty: Faulty, job_id: str, expected: str, epoch: str) -> None:
    """The card and the watchJob() end with the stored job, which is the model's text,
    once; nothing the card showed on the way was anything but a beginning of that text."""
    the_card = card(page, job_id)
    expect(the_card.locator(".badge")).to_have_text("completed", timeout=40_000)
    watcher_ended(page, job_id)
    final = get_job(faulty.api, job_id)
    assert final["status"] == "completed", final
    assert final["epoch"] != epoch, "Redis lost nothing?"
    assert final["output"] == expected and final["result"]["text"] == expected
    assert card_text(page, job_id) == final["output"]
    assert the_card.locator(".outcome").text_content() == "Completed."
    for text in shown_texts(page, job_id):
        assert expected.startswith(text), f"the card showed text the job never had: {text!r}"
    got = watched(page, job_id)
    assert got["end"] == "completed" and got["job"]["output"] == expected, got
    assert [e[0] for e in got["events"]].count("completed") == 1, got["events"]
    resets = [e for e in got["events"][1:] if e[0] == "snapshot" and e[2]]
    assert resets, f"watchJob saw no reset snapshot: {got['events']}"
    assert got["modes"] == ["stream"], got["modes"]
    assert len(toasts(page, f"{job_id[:8]} completed")) == 1, toasts(page, job_id[:8])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker", ["running", "paused"])
def test_console_card_applies_the_reset_after_redis_restarts_from_an_older_rdb(
    faulty: Faulty, page: Page, worker: str
) -> None:
    """Redis comes back with an RDB that lacks the last second of text (and an older
    seq): the worker rewrites the job, the streams send reset snapshots, and the card
    ends with the whole text once, not the RDB's, not the text twice.

    ``paused``: the worker is stopped across the restart, so the page first shows the
    RDB's state (a reset snapshot with a lower seq than it has seen), then the rewrite."""
    expected = expected_text(faulty.model_url, PROMPT)
    open_console(page, faulty.api.url)
    job_id = submit_generate(page, PROMPT)
    record(page, job_id)
    saved = crash_mid_stream(page, faulty, job_id, wipe=False, pause=worker == "paused")
    check_streamed_job(page, faulty, job_id, expected, saved["epoch"])
    assert "rewrote it" in faulty.worker.output()  # the worker repaired the store


@pytest.mark.timeout(60)
def test_console_cards_of_queued_jobs_an_empty_redis_lost_end_failed(
    faulty: Faulty, page: Page
) -> None:
    """Redis comes back empty: the running job is rewritten by its worker and completes;
    the jobs that waited queued (one behind it, one for its retry) are gone, and their
    cards say so (failed, state_lost) instead of waiting in "queued" forever."""
    expected = expected_text(faulty.model_url, PROMPT)
    open_console(page, faulty.api.url)
    retrying = submit_retrying(page)
    record(page, retrying)
    job_id = submit_generate(page, PROMPT)
    record(page, job_id)
    text_longer_than(page, job_id, 10)
    queued = submit_generate(page, QUEUED)
    record(page, queued)
    expect(card(page, queued).locator(".badge")).to_have_text("queued")
    saved = crash_mid_stream(page, faulty, job_id, wipe=True)

    for lost_id in (queued, retrying):
        lost = card(page, lost_id)
        expect(lost.locator(".badge")).to_have_text("failed", timeout=40_000)
        expect(lost.locator(".outcome")).to_contain_text("lost this job")
        expect(lost.locator(".outcome")).to_contain_text("(state_lost)")
        expect(lost.get_by_role("button", name="Retry")).to_be_visible()
        ends = toasts(page, lost_id[:8])
        assert len(ends) == 1 and "failed: the job store lost this job" in ends[0], ends
        watcher_ended(page, lost_id)
        got = watched(page, lost_id)
        assert got["end"] == "failed" and got["job"]["error"]["code"] == "state_lost", got

    check_streamed_job(page, faulty, job_id, expected, saved["epoch"])
    for lost_id in (queued, retrying):
        resp = httpx.get(f"{faulty.api.url}/v1/jobs/{lost_id}", timeout=10)
        assert resp.status_code == 404  # the store holds nothing: only the event said so
        expect(card(page, lost_id).locator(".badge")).to_have_text("failed")  # still


# watchJobs() on a page, as README shows; records what its handlers were called with.
WATCH_MANY = """
async ([ids]) => {
  const lib = await import("/static/pushsvc.js");
  const got = (window.many = {events: [], modes: [], ends: {}});
  const handlers = {mode: (m) => got.modes.push(m)};
  for (const kind of ["snapshot", "status", "progress", "output", "done", "failed"]) {
    handlers[kind] = (job, ev) => {
      got.events.push([ev.kind, ev.job_id, ev.seq]);
      if (lib.isTerminal(ev.kind)) got.ends[ev.job_id] = [ev.kind, job.error?.code ?? null];
    };
  }
  // Patient with a restarting API: EventSource resumes with Last-Event-ID meanwhile.
  lib.watchJobs(ids, handlers, {storageKey: false, maxStreamErrors: 20});
}
"""


@pytest.mark.timeout(60)
def test_watch_jobs_ends_a_lost_job_after_redis_and_the_api_restart(
    faulty: Faulty, page: Page
) -> None:
    """Redis comes back empty and the API restarts with it (the host rebooted): the
    stream resumes on a new API process, which numbers the lost job's ``state_lost``
    end from nothing it knows (seq 1). Was: pushsvc.js dropped it as already seen (it
    had seq 3 of the job), so the job stayed "queued" and the stream open forever."""
    page.goto(faulty.api.url)
    retrying = submit_retrying(page)
    page.evaluate(WATCH_MANY, [[retrying]])
    # Past seq 1 (created): a new API process numbers the lost job's end 1.
    page.wait_for_function(
        "([id]) => window.many.events.some((e) => e[1] === id && e[2] > 1)", arg=[retrying]
    )
    faulty.api.stop()
    faulty.server.crash(wipe=True)
    faulty.server.start()
    api = Api([], faulty.env, port=faulty.api.port).start()
    faulty.procs.append(api)
    try:
        page.wait_for_function("([id]) => window.many.ends[id] !== undefined", arg=[retrying])
    except PageTimeout:
        pytest.fail(f"the lost job never ended: {page.evaluate('() => window.many')}")
    got = page.evaluate("() => window.many")
    assert got["ends"][retrying] == ["failed", "state_lost"], got
    # Streamed throughout (no polling); "unreachable" while no API process answered.
    assert got["modes"] in (["stream"], ["stream", "unreachable", "stream"]), got
    assert httpx.get(f"{api.url}/v1/jobs/{retrying}", timeout=10).status_code == 404
