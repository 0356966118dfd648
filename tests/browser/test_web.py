"""The job console and pushsvc.js in a real browser (Chromium via Playwright) against real
API and worker processes: submit, live progress, reload mid-job, cancel, polling fallback.

Also defines ``typewriter``, a job type that streams text at a steady pace (``chatty``
finishes before a page could reload); API and worker load it via PUSHSVC_JOB_MODULES.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, Route, expect
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.testclient import TestClient

from pushsvc.jobs import JobContext, job_type
from pushsvc.web import make_routes, web_dir

from ..conftest import stack_env
from ..golden import WORDS
from ..procs import ROOT, Api, Proc, RedisServer
from .conftest import WEB, serve_web

ARTIFACTS = ROOT / "artifacts"
expect.set_options(timeout=20_000)  # jobs take seconds; a shared 2-core machine, more
NARROW = {"width": 390, "height": 844}


class TypewriterPayload(BaseModel):
    words: int = Field(40, ge=1, le=5000, description="how many words to write")
    interval_ms: int = Field(60, ge=0, le=5000, description="pause before each word")


@job_type("typewriter", payload=TypewriterPayload, max_attempts=1)
async def typewriter(ctx: JobContext, payload: TypewriterPayload) -> dict[str, int]:
    """Writes numbered words at a steady pace, eight to a line."""
    for i in range(payload.words):
        await asyncio.sleep(payload.interval_ms / 1000)
        await ctx.output(typewriter_word(i))
        await ctx.progress(100 * (i + 1) / payload.words, "writing", f"word {i + 1}")
    return {"words": payload.words}


def typewriter_word(i: int) -> str:
    return f"word{i:03d}" + ("\n" if i % 8 == 7 else " ")


def typewriter_text(words: int) -> str:
    return "".join(typewriter_word(i) for i in range(words))


# ---- fixtures ----


def console_env(redis_url: str, namespace: str, **extra: str) -> dict[str, str]:
    """No API keys (loopback allows it): the console needs no key."""
    env = stack_env(redis_url, namespace, **extra)
    del env["PUSHSVC_API_KEYS"], env["PUSHSVC_SECRET"]
    env["PUSHSVC_JOB_MODULES"] = "tests.jobtypes,tests.browser.test_web"
    env["PUSHSVC_PUBLISH_RATE_HZ"] = "20"  # what a real deployment would use
    return env


@pytest.fixture(scope="module")
def web(redis_server: RedisServer) -> Iterator[dict[str, Api]]:
    """A keyless API, one with streams turned off, and a worker, sharing a namespace."""
    env = console_env(redis_server.url, f"w{secrets.token_hex(3)}")
    procs: list[Proc] = []
    try:
        procs.append(Proc(["worker"], env).start())
        live = Api([], env).start()
        procs.append(live)
        polling = Api([], {**env, "PUSHSVC_STREAMS_ENABLED": "false"}).start()
        procs.append(polling)
        yield {"live": live, "polling": polling}
    finally:
        for proc in reversed(procs):
            proc.stop()


def shoot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True, animations="disabled")


def submit_in_console(page: Page, type_: str, **fields: int) -> str:
    """Fill the form for ``type_``, submit, and return the new card's job id."""
    expect(page.locator("#job-type")).to_be_enabled()
    page.select_option("#job-type", type_)
    for name, value in fields.items():
        page.fill(f"#f-{name}", str(value))
    before = page.locator(".card").count()
    page.get_by_role("button", name="Submit job").click()
    expect(page.locator(".card")).to_have_count(before + 1)
    job_id = page.locator(".card").first.get_attribute("data-job-id")
    assert job_id
    return job_id


def card(page: Page, job_id: str) -> Locator:
    return page.locator(f'.card[data-job-id="{job_id}"]')


def progress_at_least(page: Page, job_id: str, pct: int) -> None:
    page.wait_for_function(
        """([id, pct]) => {
            const bar = document.querySelector(`.card[data-job-id="${id}"] [role=progressbar]`);
            return bar && Number(bar.getAttribute("aria-valuenow")) >= pct;
        }""",
        arg=[job_id, pct],
    )


def get_job(api: Api, job_id: str) -> dict[str, Any]:
    resp = httpx.get(f"{api.url}/v1/jobs/{job_id}", timeout=10)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


# ---- serving ----


def test_pages_and_assets_are_served(web: dict[str, Api]) -> None:
    base = web["live"].url
    page = httpx.get(f"{base}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script type="module" src="/static/console.js">' in page.text
    lib = httpx.get(f"{base}/static/pushsvc.js")
    assert lib.status_code == 200
    assert "javascript" in lib.headers["content-type"]
    assert lib.headers["cache-control"] == "no-cache" and "export function watchJob" in lib.text
    again = httpx.get(f"{base}/static/pushsvc.js", headers={"If-None-Match": lib.headers["etag"]})
    assert again.status_code == 304
    missing = httpx.get(f"{base}/static/nope.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{base}/static/%2e%2e/pushsvc/web.py").status_code == 404  # no escape


def test_routes_serve_the_directory_they_are_given(tmp_path: Path) -> None:
    """Wheels ship web/ as pushsvc/_web; the routes serve whichever directory is found."""
    (tmp_path / "index.html").write_text("<!doctype html><title>packaged</title>")
    (tmp_path / "pushsvc.js").write_text("export {};")
    app = Starlette(routes=make_routes(tmp_path))
    with TestClient(app) as http:
        assert "packaged" in http.get("/").text
        assert http.get("/static/pushsvc.js").text == "export {};"
    assert web_dir() == ROOT / "web"  # a checkout: the top-level web/ (no _web here)


# ---- the console ----


def test_console_runs_a_ticker_job_to_a_completed_toast(web: dict[str, Api], page: Page) -> None:
    page.goto(web["live"].url)
    expect(page.locator("#job-type")).to_be_enabled()
    page.select_option("#job-type", "ticker")
    # The form comes from the type's JSON Schema: constraints and defaults included.
    steps = page.get_by_label("Steps")
    expect(steps).to_have_attribute("min", "1")
    expect(steps).to_have_attribute("max", "10000")
    expect(page.get_by_label("Fail retryable")).not_to_be_checked()
    job_id = submit_in_console(page, "ticker", steps=16, interval_ms=150)
    bar = card(page, job_id).get_by_role("progressbar")

    progress_at_least(page, job_id, 30)
    expect(card(page, job_id).locator(".stage")).to_contain_text("ticking")
    expect(card(page, job_id).locator(".badge")).to_have_text("running")
    shoot(page, "console-running.png")

    expect(bar).to_have_attribute("aria-valuenow", "100")
    expect(card(page, job_id).locator(".badge")).to_have_text("completed")
    expect(page.locator("#toasts")).to_have_attribute("role", "status")
    expect(page.locator("#toasts .toast")).to_contain_text(f"ticker {job_id[:8]} completed")
    expect(page.locator("#conn")).to_have_attribute("data-mode", "stream")
    expect(card(page, job_id)).to_have_attribute("data-via", "stream")
    expect(card(page, job_id).locator(".outcome")).to_have_text('Result: {"steps":16}')
    expect(card(page, job_id).locator(".stage")).to_have_text("")  # no "ticking" when done
    assert get_job(web["live"], job_id)["status"] == "completed"
    shoot(page, "console-completed.png")


@pytest.mark.timeout(90)
def test_reload_mid_job_resumes_the_card_without_losing_text(
    web: dict[str, Api], page: Page
) -> None:
    page.goto(web["live"].url)
    words = 70
    job_id = submit_in_console(page, "typewriter", words=words, interval_ms=70)
    progress_at_least(page, job_id, 20)
    before_reload = card(page, job_id).locator(".output").text_content() or ""
    assert before_reload and typewriter_text(words).startswith(before_reload)

    page.reload()
    # Resumed from localStorage while still running: the snapshot brings the text so far.
    expect(card(page, job_id).locator(".badge")).to_have_text("running")
    expect(card(page, job_id).locator(".output")).to_contain_text(before_reload.strip())
    progress_at_least(page, job_id, 60)
    shoot(page, "console-streaming.png")

    expect(card(page, job_id).locator(".badge")).to_have_text("completed", timeout=30_000)
    expect(page.locator(".toast").filter(has_text="completed")).to_have_count(1)
    shown = card(page, job_id).locator(".output").text_content()
    job = get_job(web["live"], job_id)
    assert job["output"] == typewriter_text(words)  # the worker wrote it all, once
    assert shown == job["output"]  # the page shows exactly that: no gap, no repeat

    # Finished cards come back after a reload too, without a second toast.
    page.reload()
    expect(card(page, job_id).locator(".badge")).to_have_text("completed")
    assert card(page, job_id).locator(".output").text_content() == job["output"]
    expect(page.locator(".toast")).to_have_count(0)


@pytest.mark.timeout(90)
def test_cancel_and_retry_from_the_page(web: dict[str, Api], page: Page) -> None:
    page.goto(web["live"].url)
    job_id = submit_in_console(page, "ticker", steps=30, interval_ms=100)
    the_card = card(page, job_id)
    progress_at_least(page, job_id, 10)
    the_card.get_by_role("button", name="Cancel").click()

    expect(the_card.locator(".badge")).to_have_text("cancelled")
    expect(page.locator(".toast").filter(has_text="was cancelled")).to_have_count(1)
    assert get_job(web["live"], job_id)["status"] == "cancelled"
    progress = int(the_card.get_by_role("progressbar").get_attribute("aria-valuenow") or 0)
    assert 10 <= progress < 100
    expect(the_card.get_by_role("button", name="Cancel")).to_be_hidden()
    shoot(page, "console-cancelled.png")

    # Retry runs it again from the start, on the same card, to the end.
    the_card.get_by_role("button", name="Retry").click()
    expect(the_card.locator(".badge")).not_to_have_text("cancelled")
    expect(the_card.locator(".badge")).to_have_text("completed", timeout=30_000)
    expect(the_card.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    assert get_job(web["live"], job_id)["status"] == "completed"


def test_console_polls_when_streams_are_disabled(web: dict[str, Api], page: Page) -> None:
    page.goto(web["polling"].url)
    job_id = submit_in_console(page, "typewriter", words=40, interval_ms=150)

    expect(page.locator("#conn")).to_have_attribute("data-mode", "polling")
    expect(page.locator("#conn-label")).to_contain_text("Polling")
    expect(card(page, job_id)).to_have_attribute("data-via", "polling")
    progress_at_least(page, job_id, 40)
    shoot(page, "console-polling.png")
    expect(card(page, job_id).locator(".badge")).to_have_text("completed", timeout=30_000)
    expect(card(page, job_id).get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    expect(page.locator(".toast").filter(has_text="completed")).to_have_count(1)
    shown = card(page, job_id).locator(".output").text_content()
    assert shown == get_job(web["polling"], job_id)["output"] == typewriter_text(40)


@pytest.mark.timeout(90)
def test_page_rides_out_an_api_restart(web: dict[str, Api], page: Page) -> None:
    """EventSource reconnects to the new process with Last-Event-ID: the text stays whole."""
    first = Api([], web["live"].env).start()
    second: Api | None = None
    try:
        page.goto(first.url)
        words = 60
        job_id = submit_in_console(page, "typewriter", words=words, interval_ms=80)
        progress_at_least(page, job_id, 15)
        first.stop()
        second = Api([], web["live"].env, port=first.port).start()
        expect(card(page, job_id).locator(".badge")).to_have_text("completed", timeout=40_000)
        shown = card(page, job_id).locator(".output").text_content()
        assert shown == get_job(second, job_id)["output"] == typewriter_text(words)
    finally:
        first.stop()
        if second is not None:
            second.stop()


@pytest.mark.timeout(90)
def test_polling_goes_back_to_streaming_when_it_works_again(
    web: dict[str, Api], page: Page
) -> None:
    """Streams off, then the API comes back with streams on: the watcher streams again."""
    env = web["polling"].env
    first = Api([], env).start()
    second: Api | None = None
    try:
        page.goto(first.url)
        page.evaluate(
            """async () => {
              const lib = await import("/static/pushsvc.js");
              const payload = {words: 80, interval_ms: 100};
              const job = await lib.createClient().submit("typewriter", payload);
              window.got = {modes: [], output: "", done: null, id: job.id};
              const keep = ({output, progress}) => Object.assign(window.got, {output, progress});
              lib.watchJob(job.id, {
                mode: (m) => window.got.modes.push(m),
                snapshot: keep, status: keep, progress: keep, output: keep,
                done: (j) => { keep(j); window.got.done = j.status; },
              }, {storageKey: false, streamRetryMs: 1000, pollMinMs: 200});
            }"""
        )
        page.wait_for_function("() => window.got.modes[0] === 'polling' && window.got.progress > 0")
        first.stop()
        stream_env = {**env, "PUSHSVC_STREAMS_ENABLED": "true"}
        second = Api([], stream_env, port=first.port).start()
        page.wait_for_function("() => window.got.done !== null", timeout=30_000)
        got = page.evaluate("() => window.got")
        # Between the two processes nothing answered: said so, while it lasted.
        assert got["modes"][0] == "polling" and got["modes"][-1] == "stream", got["modes"]
        assert set(got["modes"]) <= {"polling", "unreachable", "stream"}, got["modes"]
        assert got["done"] == "completed"
        assert got["output"] == get_job(second, got["id"])["output"] == typewriter_text(80)
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_console_asks_for_an_api_key_and_uses_it(stack: dict[str, Any], page: Page) -> None:
    page.goto(stack["api"].url)
    key_field = page.get_by_label("API key")
    expect(key_field).to_be_visible()  # the server answered 401: the key panel opened
    expect(page.locator("#conn")).to_have_attribute("data-mode", "offline")
    key_field.fill("key-d")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#job-type")).to_be_enabled()
    page.select_option("#job-type", "ticker")
    job_id = submit_in_console(page, "ticker", steps=5, interval_ms=60)
    expect(card(page, job_id).locator(".badge")).to_have_text("completed")
    expect(page.locator("#conn")).to_have_attribute("data-mode", "stream")
    resp = httpx.get(
        f"{stack['api'].url}/v1/jobs/{job_id}", headers={"Authorization": "Bearer key-d"}
    )
    assert resp.json()["status"] == "completed"  # submitted as that key's tenant
    page.reload()  # the key is remembered
    expect(card(page, job_id).locator(".badge")).to_have_text("completed")


def test_console_on_a_narrow_screen_and_by_keyboard(web: dict[str, Api], browser: Browser) -> None:
    context = browser.new_context(viewport=NARROW, is_mobile=True)
    try:
        page = context.new_page()
        page.goto(web["live"].url)
        expect(page.locator("#job-type")).to_be_enabled()
        page.select_option("#job-type", "typewriter")
        # From the keyboard: type into a field and submit with Enter.
        page.locator("#f-words").focus()
        page.keyboard.press("Control+A")
        page.keyboard.type("12")
        page.keyboard.press("Enter")
        the_card = page.locator(".card").first
        # The list is below the form here: the page scrolls to the new card.
        expect(the_card).to_be_in_viewport()
        expect(the_card.locator(".badge")).to_have_text("completed", timeout=30_000)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= NARROW["width"], "the page scrolls sideways on a phone"
        shoot(page, "console-narrow.png")
    finally:
        context.close()


# ---- the console when things go wrong ----


@pytest.mark.timeout(120)
def test_console_says_when_the_server_is_unreachable(web: dict[str, Api], page: Page) -> None:
    """Bug: with the API stopped for 40 s the pill said "Polling (streaming unavailable)",
    the card "live", and Submit "Failed to fetch"; nothing said the server was gone."""
    first = Api([], web["live"].env).start()
    second: Api | None = None
    try:
        page.goto(first.url)
        job_id = submit_in_console(page, "ticker", steps=120, interval_ms=100)
        progress_at_least(page, job_id, 3)
        expect(page.locator("#conn")).to_have_attribute("data-mode", "stream")
        first.stop()

        expect(page.locator("#conn-label")).to_have_text("Server unreachable, retrying…")
        expect(card(page, job_id).locator(".via")).to_have_text("server unreachable, retrying")
        page.get_by_role("button", name="Submit job").click()
        expect(page.locator("#form-error")).to_contain_text("Cannot reach the server")
        expect(page.locator("#form-error")).not_to_contain_text("Failed to fetch")
        shoot(page, "console-offline.png")

        second = Api([], web["live"].env, port=first.port).start()
        expect(page.locator("#conn")).to_have_attribute("data-mode", "stream")
        expect(page.locator("#conn-label")).to_have_text("Live: streaming")
        expect(card(page, job_id).locator(".via")).to_have_text("live")
        expect(card(page, job_id).locator(".badge")).to_have_text("completed", timeout=30_000)
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_an_empty_required_field_is_marked_with_the_servers_words(
    web: dict[str, Api], page: Page
) -> None:
    """Bug: ``generate`` with its prompt left empty said "the payload does not match the
    'generate' job type" and marked nothing, though the server had said "'prompt' is a
    required property" (a ``required`` error sits on the payload, not on the field)."""
    page.goto(web["live"].url)
    expect(page.locator("#job-type")).to_be_enabled()
    page.select_option("#job-type", "generate")
    page.get_by_role("button", name="Submit job").click()

    prompt = page.get_by_label("Prompt")
    expect(prompt).to_have_attribute("aria-invalid", "true")
    expect(prompt).to_be_focused()
    expect(page.locator("#f-prompt-error")).to_have_text("'prompt' is a required property")
    expect(prompt).to_have_accessible_description(re.compile("is a required property"))
    expect(page.locator("#form-error")).to_have_text("Check the marked fields.")
    expect(page.locator(".card")).to_have_count(0)

    prompt.fill("[[tokens:3]] hello")
    page.get_by_role("button", name="Submit job").click()
    expect(page.locator(".card")).to_have_count(1)
    expect(prompt).not_to_have_attribute("aria-invalid", "true")
    expect(page.locator("#f-prompt-error")).to_be_hidden()


@pytest.mark.timeout(90)
def test_a_stream_that_cannot_open_is_polled_at_once_then_streamed(
    web: dict[str, Api], page: Page
) -> None:
    """Bug: with the events URL blocked (EventSource never opens) a card sat at "queued
    0% · live" for 6.5 s, three of the browser's own reconnects, before polling."""
    blocked = re.compile(r"/v1/events\?")
    page.route(blocked, lambda route: route.abort())
    page.goto(web["live"].url)
    job_id = submit_in_console(page, "ticker", steps=150, interval_ms=100)

    # About 2 s at most (here: the first poll follows the first error at once).
    expect(card(page, job_id)).to_have_attribute("data-via", "polling", timeout=3_000)
    expect(page.locator("#conn")).to_have_attribute("data-mode", "polling")
    expect(card(page, job_id).locator(".badge")).to_have_text("running")
    progress_at_least(page, job_id, 5)

    page.unroute(blocked)  # the stream can open again: it is tried soon, and taken
    expect(page.locator("#conn")).to_have_attribute("data-mode", "stream")
    expect(card(page, job_id)).to_have_attribute("data-via", "stream")
    expect(card(page, job_id).locator(".badge")).to_have_text("completed", timeout=30_000)
    assert get_job(web["live"], job_id)["progress"] == 100


@pytest.mark.timeout(90)
def test_a_refused_retry_is_said_on_the_card(web: dict[str, Api], page: Page) -> None:
    """Bug: a retry the server refused (409) showed a toast for 8 s and left the card
    as it was, with its Retry button, as if nothing had been tried."""
    api = web["live"]
    page.goto(api.url)
    job_id = submit_in_console(page, "ticker", steps=40, interval_ms=100)
    the_card = card(page, job_id)
    progress_at_least(page, job_id, 5)
    the_card.get_by_role("button", name="Cancel").click()
    expect(the_card.locator(".badge")).to_have_text("cancelled")

    def retried_elsewhere_first(route: Route) -> None:
        # Another tab retries it first; ours then meets the server's real 409.
        resp = httpx.post(f"{api.url}/v1/jobs/{job_id}/retry", timeout=10)
        assert resp.status_code == 202, resp.text
        route.continue_()

    page.route(re.compile(r"/retry$"), retried_elsewhere_first)
    the_card.get_by_role("button", name="Retry").click()
    note = the_card.get_by_role("alert")
    expect(note).to_be_visible()
    expect(note).to_contain_text("Retry refused by the server: cannot retry a job that is")
    expect(the_card.locator(".badge")).not_to_have_text("cancelled")  # the other run shows
    # Said until the job ends again.
    expect(the_card.locator(".badge")).to_have_text("completed", timeout=30_000)
    expect(note).to_be_hidden()


# Which visible card buttons a toast covers (their accessible names).
COVERED = """() => {
  const toasts = [...document.querySelectorAll(".toast")].map((t) => t.getBoundingClientRect());
  const over = (r, t) =>
    r.left < t.right && t.left < r.right && r.top < t.bottom && t.top < r.bottom;
  return [...document.querySelectorAll(".card button")]
    .filter((b) => b.offsetParent !== null)
    .filter((b) => toasts.some((t) => over(b.getBoundingClientRect(), t)))
    .map((b) => b.getAttribute("aria-label"));
}"""


@pytest.mark.parametrize("viewport", [None, NARROW], ids=["wide", "narrow"])
def test_toasts_leave_the_cards_buttons_clear(
    web: dict[str, Api], browser: Browser, viewport: dict[str, int] | None
) -> None:
    """Bug: toasts floated over the cards' Dismiss and Retry buttons. Wide: they sit under
    the form. Narrow: they float at the bottom, and the page keeps room for them."""
    context = browser.new_context(viewport=viewport or {"width": 1280, "height": 860})
    try:
        page = context.new_page()
        page.goto(web["live"].url)
        ids = [submit_in_console(page, "ticker", steps=2, interval_ms=50) for _ in range(2)]
        for job_id in ids:
            expect(card(page, job_id).locator(".badge")).to_have_text("completed")
        expect(page.locator(".toast")).to_have_count(2)
        page.evaluate("() => window.scrollTo(0, document.documentElement.scrollHeight)")
        assert page.evaluate(COVERED) == []
        last = card(page, ids[0])  # the oldest: at the bottom of the list
        expect(last.get_by_role("button", name="Dismiss")).to_be_in_viewport()
        last.get_by_role("button", name="Dismiss").click(timeout=5_000)
        expect(last).to_have_count(0)
    finally:
        context.close()


# ---- pushsvc.js on its own, with API keys ----

WATCH = """
async ([apiKey, ids, mode, eventsUrl]) => {
  const lib = await import("/static/pushsvc.js");
  const seen = [];
  const modes = [];
  return await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("timed out: " + JSON.stringify(seen))), 25000);
    const left = new Set(ids);
    const handlers = { mode: (m) => modes.push(m), error: (e) => seen.push(["error", e.code]) };
    let handle;
    const end = (job) => {
      left.delete(job.id);
      if (left.size === 0) {
        clearTimeout(timer);
        handle.close();
        resolve({ seen, modes, jobs: ids.map((id) => handle.job(id)) });
      }
    };
    for (const kind of ["snapshot", "status", "progress", "output"]) {
      handlers[kind] = (job, ev) => seen.push([kind, ev.job_id, ev.seq]);
    }
    for (const kind of ["done", "failed", "cancelled"]) {
      handlers[kind] = (job, ev) => { seen.push([kind, ev.job_id, ev.seq]); end(job); };
    }
    const options = { apiKey, eventsUrl, storageKey: false };
    handle = mode === "one" ? lib.watchJob(ids[0], handlers, options)
                            : lib.watchJobs(ids, handlers, options);
  });
}
"""


def _submit(api: Api, key: str, type_: str, payload: dict[str, Any]) -> dict[str, Any]:
    resp = httpx.post(
        f"{api.url}/v1/jobs",
        json={"type": type_, "payload": payload},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert resp.status_code == 202, resp.text
    body: dict[str, Any] = resp.json()
    return body


def _check_gap_free(seen: list[list[Any]], job_id: str, final: dict[str, Any]) -> None:
    mine = [e for e in seen if e[1] == job_id]
    assert mine[0][0] == "snapshot", mine
    seqs = [e[2] for e in mine]
    # A job that ended before the watch began: its snapshot, then its end at the same seq.
    late = len(mine) == 2 and mine[1][0] == "done" and seqs[0] == seqs[1]
    assert late or seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    assert mine[-1] == ["done", job_id, final["seq"]]


def test_watch_job_and_jobs_with_api_keys_and_tokens(stack: dict[str, Any], page: Page) -> None:
    """Keys on the server: job-scoped links, tenant stream tokens, a refused token renewed."""
    api: Api = stack["api"]
    page.goto(api.url)
    key = "key-b"
    one = _submit(api, key, "ticker", {"steps": 8, "interval_ms": 40})
    got = page.evaluate(WATCH, [key, [one["id"]], "one", one["links"]["events"]])
    final = httpx.get(
        f"{api.url}/v1/jobs/{one['id']}", headers={"Authorization": f"Bearer {key}"}
    ).json()
    _check_gap_free(got["seen"], one["id"], final)
    assert got["modes"] == ["stream"]
    for field in ("status", "progress", "stage", "message", "result", "seq", "output"):
        assert got["jobs"][0][field] == final[field], field

    # A stale token (here: a forged one) is refused with 401: the library gets a new link.
    forged = f"/v1/jobs/{one['id']}/events?token=expired.token"
    two = _submit(api, key, "ticker", {"steps": 6, "interval_ms": 40})
    got = page.evaluate(WATCH, [key, [two["id"]], "one", forged.replace(one["id"], two["id"])])
    assert got["seen"][-1][0] == "done" and got["modes"] == ["stream"], got

    # Many jobs over one multiplexed stream, with a tenant token from /v1/stream-tokens.
    jobs = [_submit(api, key, "ticker", {"steps": 5, "interval_ms": 50}) for _ in range(3)]
    ids = [j["id"] for j in jobs]
    got = page.evaluate(WATCH, [key, ids, "many", None])
    assert got["modes"] == ["stream"]
    for job_id in ids:
        final = httpx.get(
            f"{api.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}
        ).json()
        _check_gap_free(got["seen"], job_id, final)


ALL = """
async ([apiKey, count, payload]) => {
  const lib = await import("/static/pushsvc.js");
  const client = lib.createClient({apiKey});
  const done = new Map();
  const modes = [];
  let submitted = [];
  await new Promise((resolve, reject) => {
    setTimeout(() => reject(new Error("timed out: " + JSON.stringify([...done]))), 25000);
    const end = (kind) => (job) => {
      done.set(job.id, [kind, job.progress]);
      if (submitted.length === count && submitted.every((id) => done.has(id))) resolve();
    };
    const handle = lib.watchJobs("all", {
      mode: (m) => modes.push(m), done: end("done"), failed: end("failed"),
    }, {apiKey, storageKey: false, pollMinMs: 200});
    window.closeAll = () => handle.close();
    (async () => {
      for (let i = 0; i < count; i++) submitted.push((await client.submit("ticker", payload)).id);
    })();
  });
  window.closeAll();
  return {modes, done: submitted.map((id) => done.get(id))};
}
"""


def test_watch_all_jobs_of_a_tenant(stack: dict[str, Any], web: dict[str, Api], page: Page) -> None:
    """watchJobs("all"): jobs created later announce themselves; polled from the list too."""
    payload = {"steps": 4, "interval_ms": 100}
    page.goto(stack["api"].url)
    got = page.evaluate(ALL, ["key-e", 3, payload])
    assert got == {"modes": ["stream"], "done": [["done", 100]] * 3}

    page.goto(web["polling"].url)  # no keys, streams off: GET /v1/jobs?limit= instead
    got = page.evaluate(ALL, [None, 2, payload])
    assert got == {"modes": ["polling"], "done": [["done", 100]] * 2}


def test_jobs_added_while_a_stream_opens_are_all_watched(stack: dict[str, Any], page: Page) -> None:
    """add() while the stream for earlier jobs is still opening (awaiting its token)."""
    api: Api = stack["api"]
    page.goto(api.url)
    jobs = [_submit(api, "key-f", "ticker", {"steps": 5, "interval_ms": 60}) for _ in range(2)]
    got = page.evaluate(
        """async ([a, b]) => {
          const lib = await import("/static/pushsvc.js");
          const done = new Set();
          const modes = [];
          return await new Promise((resolve, reject) => {
            setTimeout(() => reject(new Error("timed out: " + [...done])), 20000);
            const h = lib.watchJobs([], {mode: (m) => modes.push(m), done: (job) => {
              done.add(job.id);
              if (done.size === 2) { h.close(); resolve({modes, done: [...done].sort()}); }
            }}, {apiKey: "key-f", storageKey: false});
            h.add(a);
            setTimeout(() => h.add(b), 0);  // while the first open awaits its token
          });
        }""",
        [j["id"] for j in jobs],
    )
    assert got == {"modes": ["stream"], "done": sorted(j["id"] for j in jobs)}


def test_a_wrong_api_key_is_reported_not_retried_forever(stack: dict[str, Any], page: Page) -> None:
    api: Api = stack["api"]
    page.goto(api.url)
    job = _submit(api, "key-c", "ticker", {"steps": 200, "interval_ms": 50})
    got = page.evaluate(
        """async ([id]) => {
          const lib = await import("/static/pushsvc.js");
          return await new Promise((resolve) => {
            const h = lib.watchJob(id, {error: (e) => { h.close(); resolve([e.status, e.code]); }},
                                   {apiKey: "not-a-key", storageKey: false});
          });
        }""",
        [job["id"]],
    )
    assert got == [401, "invalid_credentials"]
    httpx.delete(f"{api.url}/v1/jobs/{job['id']}", headers={"Authorization": "Bearer key-c"})


# ---- pushsvc.js's handlers, against a fake API (the page's routes) ----

FINAL_DATA = {
    "completed": {"result": {"ok": True}, "error": None},
    "failed": {"error": {"code": "boom", "message": "it broke", "retryable": False}},
    "cancelled": {},
}


def job_stream(final: str) -> str:
    """A job's whole stream, as the API sends it for a job that just ended."""
    snapshot = {"job_id": final, "seq": 1, "ts": 1.0, "id": final, "type": "ticker"}
    snapshot |= {"status": "running", "progress": 50.0, "output": "", "attempt": 1}
    end = {"job_id": final, "seq": 2, "ts": 2.0, **FINAL_DATA[final]}
    return (
        "retry: 2000\n\n"
        f"id: 1.e\nevent: snapshot\ndata: {json.dumps(snapshot)}\n\n"
        f"id: 2.e\nevent: {final}\ndata: {json.dumps(end)}\n\n"
    )


def test_done_follows_every_final_event(page: Page) -> None:
    """Bug: pushsvc.js called ``done`` for ``completed`` only (it was that kind's handler),
    so a page that waited on ``done`` waited forever for a failed or cancelled job."""

    def stream(final: str) -> Callable[[Route], None]:
        return lambda route: route.fulfill(body=job_stream(final), content_type="text/event-stream")

    serve_web(page, {f"/v1/jobs/{final}/events": stream(final) for final in FINAL_DATA})
    calls = page.evaluate(
        """async (finals) => {
          const lib = await import("/static/pushsvc.js");
          const calls = {};
          for (const final of finals) {
            calls[final] = await new Promise((resolve) => {
              const seen = [];
              const handlers = {};
              for (const name of ["snapshot", "completed", "failed", "cancelled", "done"]) {
                handlers[name] = (job, ev) => {
                  seen.push([name, ev.kind, job.status]);
                  if (name === "done") resolve(seen);
                };
              }
              lib.watchJob(final, handlers,
                           {storageKey: false, eventsUrl: `/v1/jobs/${final}/events`});
            });
          }
          return calls;
        }""",
        list(FINAL_DATA),
    )
    for final in FINAL_DATA:
        assert calls[final] == [
            ["snapshot", "snapshot", "running"],
            [final, final, final],  # the kind's own handler first
            ["done", final, final],
        ], calls


# ---- the console: place in line, waits and model telemetry ----

WORDS_JS = """
async (cases) => {
  const page = await import("/static/page.js");
  const now = 1000;  // words.json's
  return {
    waits: cases.waits.map((w) => page.waitWords(w, now)),
    lines: cases.lines.map(([pos, starts]) => page.lineWords(pos, starts)),
    llm: cases.llm.map((t) => page.llmWords(t)),
  };
}
"""
TELEMETRY = WORDS["llm"][0][0]


def test_waits_places_and_telemetry_in_words(page: Page) -> None:
    """page.js's words for the new fields: tests/golden/words.json, which pushsvc submit
    --follow says too (tests/tools/test_submit.py)."""
    serve_web(page)
    cases = {name: [given for given, _ in WORDS[name]] for name in ("waits", "lines", "llm")}
    got = page.evaluate(WORDS_JS, cases)
    for name in ("waits", "lines", "llm"):
        assert got[name] == [said for _, said in WORDS[name]], name


def _frame(kind: str, data: dict[str, Any], event_id: str | None) -> str:
    head = f"id: {event_id}\n" if event_id else ""  # a `queue` event has no id
    return f"{head}event: {kind}\ndata: {json.dumps(data)}\n\n"


def _queued(job_id: str, seq: int, **fields: Any) -> dict[str, Any]:
    job = {"job_id": job_id, "seq": seq, "ts": time.time(), "id": job_id, "type": "generate"}
    job |= {"status": "queued", "progress": 0, "output": "", "attempt": 1, "max_attempts": 3}
    job |= {"created_at": time.time(), "queue_position": None, "starts_in_s": None}
    job |= {"waiting": None, "llm": None, "error": None, "result": None}
    return job | fields


def test_a_stale_queued_snapshot_does_not_undo_a_start(page: Page) -> None:
    """Bug (a CI run of the dashboard): a list taken while a job was queued, added after
    the stream had said it was running, put it back to queued (a queued snapshot whose
    place in line differed was taken as news whatever its seq), and later progress events
    kept it there: the badge said "queued" until the job ended."""
    job_id = str(uuid.uuid4())
    queued = _queued(job_id, 1, queue_position=1, starts_in_s=0.5)
    running = {"job_id": job_id, "seq": 2, "ts": time.time(), "status": "running", "attempt": 1}
    progress = {"job_id": job_id, "seq": 3, "ts": time.time(), "progress": 40.0}
    body = "retry: 600000\n\n" + _frame("snapshot", queued | {"queue_position": 2}, "1.e")
    body += _frame("status", running, "2.e") + _frame("progress", progress, "3.e")
    events = lambda route: route.fulfill(body=body, content_type="text/event-stream")  # noqa: E731
    serve_web(page, {"/v1/events": events})
    got = page.evaluate(
        """async (stale) => {
          const lib = await import("/static/pushsvc.js");
          return await new Promise((resolve, reject) => {
            setTimeout(() => reject(new Error("timed out")), 20000);
            const seen = [];
            const h = lib.watchJobs("all", {
              status: (job) => seen.push(["status", job.status]),
              progress: (job) => {
                seen.push(["progress", job.status]);
                h.add(stale.id, stale);  // the list's answer, late
                const {status, progress} = h.job(stale.id);
                h.close();
                resolve({seen, status, progress});
              },
            }, {storageKey: false});
          });
        }""",
        queued,
    )
    assert got == {
        "seen": [["status", "running"], ["progress", "running"]],
        "status": "running",
        "progress": 40.0,
    }


def test_console_shows_place_in_line_waits_and_telemetry(page: Page) -> None:
    """The console against a fake API whose stream brings the new fields: a queued job's
    place (moved by a `queue` event), each wait in words counting down, and a running
    job's model telemetry."""
    ids = [str(uuid.uuid4()) for _ in range(5)]
    inline, limited, modelled, capped, running = ids
    now = time.time()
    frames = [
        _frame("snapshot", _queued(inline, 1, queue_position=3, starts_in_s=12), "1"),
        _frame(
            "queue",
            {"job_id": inline, "seq": 1, "ts": now, "queue_position": 2, "starts_in_s": 8},
            None,
        ),
        _frame(
            "snapshot",
            _queued(limited, 4, waiting={"reason": "rate_limited", "until": now + 30}),
            "2",
        ),
        _frame(
            "snapshot",
            _queued(modelled, 2, waiting={"reason": "model_limit", "until": now + 2}),
            "3",
        ),
        _frame(
            "snapshot", _queued(capped, 2, waiting={"reason": "tenant_limit", "until": None}), "4"
        ),
        _frame(
            "snapshot",
            _queued(running, 9, status="running", progress=40, output="The tide", llm=TELEMETRY),
            "5",
        ),
    ]
    body = "retry: 600000\n\n" + "".join(frames)
    types = {"types": [{"name": "generate", "description": "", "payload_schema": {}}]}
    page.add_init_script(f"localStorage.setItem('pushsvc.jobs', '{json.dumps(ids)}')")
    serve_web(
        page,
        {
            "/": lambda route: route.fulfill(
                body=(WEB / "index.html").read_text(), content_type="text/html"
            ),
            "/v1/job-types": lambda route: route.fulfill(json=types),
            "/v1/events": lambda route: route.fulfill(body=body, content_type="text/event-stream"),
        },
    )
    expect(card(page, inline).locator(".line")).to_have_text("2nd in line, starts in ~8 s")
    expect(card(page, inline).locator(".stage")).to_have_text("")
    limited_line = card(page, limited).locator(".line")
    expect(limited_line).to_have_text(re.compile(r"^provider rate limit, retrying in (29|30) s$"))
    expect(card(page, capped).locator(".line")).to_have_text("your running-job limit is reached")
    expect(card(page, running).locator(".llm")).to_have_text(
        "gpt-4o-mini · first token 420 ms · 85 tok/s · 12 in + 120 out tokens · $0.0012"
    )
    expect(card(page, running).locator(".line")).to_be_hidden()
    expect(card(page, inline).locator(".llm")).to_be_hidden()
    shoot(page, "console-waits.png")
    # Counting down between events: the model limit's 2 s run out.
    modelled_line = card(page, modelled).locator(".line")
    expect(modelled_line).to_have_text(re.compile(r"^model limit, starts in [12] s$"))
    expect(modelled_line).to_have_text("model limit, starts now", timeout=5_000)


@pytest.fixture(scope="module")
def llm_web(redis_server: RedisServer, model_url: str) -> Iterator[Api]:
    """A keyless API and a worker on the offline model."""
    env = console_env(
        redis_server.url,
        f"wl{secrets.token_hex(3)}",
        llm_base_url=model_url,
        llm_api_key="offline",
        llm_model="fake-1",
    )
    worker = Proc(["worker"], env).start()
    api = Api([], env).start()
    yield api
    api.stop()
    worker.stop()


@pytest.mark.timeout(90)
def test_console_counts_down_to_a_retry(llm_web: Api, page: Page) -> None:
    """The model answers 429 with a 6 s retry hint: the card says the attempt failed and
    counts down to the next one, which then streams the answer."""
    page.goto(llm_web.url)
    expect(page.locator("#job-type")).to_be_enabled()
    page.select_option("#job-type", "generate")
    page.fill("#f-prompt", f"[[fault:429:times=1:after=6]] {secrets.token_hex(4)} [[tokens:12]]")
    page.get_by_role("button", name="Submit job").click()
    the_card = page.locator(".card").first
    line = the_card.locator(".line")
    expect(line).to_have_text(re.compile(r"retrying in [1-9]\d* s$"))
    expect(the_card.locator(".outcome")).to_contain_text("Attempt 1 failed")
    first = int(re.findall(r"(\d+) s$", line.text_content() or "")[0])
    expect(line).not_to_have_text(re.compile(rf"retrying in {first} s$"))  # it counts down
    expect(the_card.locator(".badge")).to_have_text("completed", timeout=40_000)
    expect(line).to_be_hidden()
    job = get_job(llm_web, the_card.get_attribute("data-job-id") or "")
    if job.get("llm"):  # telemetry, where the worker reports it
        expect(the_card.locator(".llm")).to_contain_text(job["llm"]["model"])
