"""The live dashboard at ``/dashboard`` in a real browser (Chromium via Playwright) against
real API and worker processes: stats pushed over SSE, recent jobs live, alerts, fallback.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, Request, Route, expect

from ..procs import Api, Proc, RedisServer
from .test_web import NARROW, console_env, shoot

PUSH_S = "0.3"  # a stats frame every 0.3 s: the page follows quickly

# ---- fixtures ----


@pytest.fixture(scope="module")
def dash(redis_server: RedisServer, model_url: str) -> Iterator[dict[str, Api]]:
    """Keyless APIs pushing stats every 0.3 s: ``live`` and ``stuck`` (a job silent for 1 s
    is stuck there) share a namespace with a worker (on the offline model, ``fake-1``
    priced); ``idle`` has a namespace without one.
    """
    model = {"llm_base_url": model_url, "llm_model": "fake-1", "llm_prices": "fake-1=1000/2000"}
    env = console_env(redis_server.url, f"d{secrets.token_hex(3)}", stats_push_s=PUSH_S, **model)
    idle_env = console_env(
        redis_server.url, f"d{secrets.token_hex(3)}", stats_push_s=PUSH_S, alert_queue_depth="2"
    )
    procs: list[Proc] = []
    try:
        procs.append(Proc(["worker"], env).start())
        live = Api([], env).start()
        procs.append(live)
        stuck = Api([], {**env, "PUSHSVC_ALERT_STUCK_S": "1"}).start()
        procs.append(stuck)
        idle = Api([], idle_env).start()
        procs.append(idle)
        yield {"live": live, "stuck": stuck, "idle": idle}
    finally:
        for proc in reversed(procs):
            proc.stop()


# ---- helpers ----


def tile(page: Page, metric: str) -> Locator:
    return page.locator(f'.tile[data-metric="{metric}"]')


def value(page: Page, metric: str) -> Locator:
    return tile(page, metric).locator(".value")


def row(page: Page, job_id: str) -> Locator:
    return page.locator(f'#recent-body tr[data-job-id="{job_id}"]')


def alert(page: Page, name: str) -> Locator:
    return page.locator(f'#alert-list .alert[data-name="{name}"]')


def submit(api: Api, payload: dict[str, Any], type_: str = "ticker", key: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    resp = httpx.post(
        f"{api.url}/v1/jobs",
        json={"type": type_, "payload": payload},
        headers=headers,
        timeout=10,
    )
    assert resp.status_code == 202, resp.text
    job_id: str = resp.json()["id"]
    return job_id


def overall(api: Api) -> dict[str, Any]:
    resp = httpx.get(f"{api.url}/v1/stats", timeout=10)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()["overall"]
    return body


def record(page: Page) -> list[str]:
    """The paths (with query) of every request the page makes from now on."""
    seen: list[str] = []

    def note(request: Request) -> None:
        url = urlsplit(request.url)
        seen.append(url.path + (f"?{url.query}" if url.query else ""))

    page.on("request", note)
    return seen


def progress_at_least(page: Page, job_id: str, pct: int) -> None:
    page.wait_for_function(
        """([id, pct]) => {
            const bar = document.querySelector(`tr[data-job-id="${id}"] [role=progressbar]`);
            return bar && Number(bar.getAttribute("aria-valuenow")) >= pct;
        }""",
        arg=[job_id, pct],
    )


# ---- serving ----


def test_dashboard_page_is_served_and_linked(dash: dict[str, Api]) -> None:
    base = dash["live"].url
    page = httpx.get(f"{base}/dashboard", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-cache"
    assert '<script type="module" src="/static/dashboard.js"></script>' in page.text
    assert len(re.findall(r"<script\b", page.text)) == 1  # no inline script (the CSP)
    assert 'href="/"' in page.text  # back to the console ...
    console = httpx.get(f"{base}/", timeout=10).text
    assert 'href="/dashboard"' in console  # ... and to here
    assert 'href="/docs"' in page.text and 'href="/docs"' in console  # the API reference
    js = httpx.get(f"{base}/static/dashboard.js", timeout=10)
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]


# ---- live over SSE ----


@pytest.mark.timeout(120)
def test_dashboard_follows_the_live_feed_without_polling(dash: dict[str, Api], page: Page) -> None:
    api = dash["live"]
    before = overall(api)["completed"]
    requests = record(page)
    page.goto(f"{api.url}/dashboard")
    page.evaluate("() => { window.sameDocument = true; }")  # gone if the page reloads

    # Numbers from the feed: the worker's heartbeat, the namespace's counts.
    expect(page.locator("#conn")).to_have_attribute("data-mode", "stream")
    expect(page.locator("#conn-label")).to_have_text("Live: streaming")
    expect(value(page, "workers")).to_have_text("1")
    expect(value(page, "queue_depth")).to_have_text("0")
    expect(value(page, "completed")).to_have_text(str(before))
    expect(page.locator("#window-note")).to_contain_text("updated")
    expect(page.locator("#alerts-summary")).to_contain_text("All clear")
    shoot(page, "dashboard-clear.png")

    # A slower job: running, its progress moving, in the tiles and the recent list.
    slow = submit(api, {"steps": 25, "interval_ms": 120})
    expect(row(page, slow).locator(".badge")).to_have_text("running")
    progress_at_least(page, slow, 20)
    expect(row(page, slow).locator(".stage")).to_contain_text("ticking")
    expect(value(page, "running")).to_have_text("1")

    quick = [submit(api, {"steps": 2, "interval_ms": 30}) for _ in range(4)]
    for job_id in [slow, *quick]:
        expect(row(page, job_id).locator(".badge")).to_have_text("completed")
    expect(row(page, slow).get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    expect(value(page, "completed")).to_have_text(str(before + 5))
    expect(value(page, "throughput")).to_have_text(re.compile(r"^(?!0jobs)[\d.]+jobs/s$"))
    expect(value(page, "success_rate")).to_have_text("100%")
    ticker = page.locator('#types-body tr[data-type="ticker"]')
    expect(ticker.locator("td").first).to_have_text(str(before + 5))
    assert page.locator("#recent-body tr").first.get_attribute("data-job-id") == quick[-1]

    # A failing burst: the failure-rate alert, spelled out, and the tiles and table agree.
    running = submit(api, {"steps": 80, "interval_ms": 100})
    failing = [submit(api, {"steps": 1, "interval_ms": 0, "fail_at_step": 1}) for _ in range(5)]
    failure = alert(page, "failure_rate")
    expect(failure).to_be_visible()
    expect(failure.locator(".alert-title")).to_have_text("High failure rate")
    expect(failure.locator(".alert-what")).to_contain_text("of the jobs decided in the window")
    expect(failure.locator(".alert-means")).to_contain_text("which types fail")
    expect(page.locator("#alerts-summary")).to_contain_text("High failure rate")
    expect(page.locator("#alerts-summary")).to_have_attribute("aria-live", "assertive")
    expect(tile(page, "success_rate")).to_have_attribute("data-state", "bad")
    for job_id in failing:
        expect(row(page, job_id).locator(".badge")).to_have_text("failed")
        expect(row(page, job_id).locator(".stage")).to_contain_text("failed at step 1")
    expect(ticker.locator("td").nth(1)).to_have_text("5")
    expect(row(page, running).locator(".badge")).to_have_text("running")
    progress_at_least(page, running, 10)
    shoot(page, "dashboard.png")
    page.emulate_media(color_scheme="dark")
    shoot(page, "dashboard-dark.png")

    # All of it came over the two streams: no GET /v1/stats, nothing reloaded.
    assert page.evaluate("() => window.sameDocument") is True
    assert [p for p in requests if p.startswith("/v1/stats")] == ["/v1/stats/events"]
    # The recent jobs: listed at load, and once more when their stream is live (a job
    # made and finished between the two is in neither otherwise); never polled.
    assert [p for p in requests if p.startswith("/v1/jobs")] == ["/v1/jobs?limit=20"] * 2
    assert [p for p in requests if p.startswith("/v1/events")] == ["/v1/events"]
    httpx.delete(f"{api.url}/v1/jobs/{running}", timeout=10)


@pytest.mark.timeout(90)
def test_a_silent_running_job_shows_the_stuck_alert(dash: dict[str, Api], page: Page) -> None:
    """On an API whose stuck threshold is 1 s, a job silent for 4 s is stuck, then is not."""
    api = dash["stuck"]
    page.goto(f"{api.url}/dashboard")
    expect(page.locator("#conn")).to_have_attribute("data-mode", "stream")
    expect(alert(page, "stuck_jobs")).to_have_count(0)
    job_id = submit(api, {"steps": 1, "interval_ms": 4000}, type_="fragile")

    stuck = alert(page, "stuck_jobs")
    expect(stuck).to_be_visible()
    expect(stuck.locator(".alert-title")).to_have_text("Stuck jobs")
    expect(stuck.locator(".alert-what")).to_contain_text("1 running job sent no event for over 1 s")
    expect(stuck.locator(".alert-what")).to_contain_text(job_id[:8])  # ours: named
    expect(tile(page, "running")).to_have_attribute("data-state", "bad")
    expect(row(page, job_id).locator(".badge")).to_have_text("running")

    expect(row(page, job_id).locator(".badge")).to_have_text("completed")
    expect(stuck).to_have_count(0)


@pytest.mark.timeout(90)
def test_no_workers_and_a_growing_queue_are_alerts(dash: dict[str, Api], page: Page) -> None:
    """A namespace without a worker: workers_absent at once, queue_depth past 2 jobs."""
    api = dash["idle"]
    page.goto(f"{api.url}/dashboard")
    absent = alert(page, "workers_absent")
    expect(absent).to_be_visible()
    expect(absent.locator(".alert-title")).to_have_text("No workers")
    expect(absent.locator(".alert-means")).to_contain_text("Queued jobs will not start")
    expect(value(page, "workers")).to_have_text("0")
    expect(tile(page, "workers")).to_have_attribute("data-state", "bad")
    expect(alert(page, "queue_depth")).to_have_count(0)

    ids = [submit(api, {"steps": 3}) for _ in range(3)]
    queue = alert(page, "queue_depth")
    expect(queue).to_be_visible()
    expect(queue).to_have_attribute("data-severity", "warning")
    expect(queue.locator(".alert-what")).to_contain_text("3 jobs waiting")
    expect(value(page, "queue_depth")).to_have_text("3")
    expect(value(page, "oldest_queued")).to_have_text(re.compile(r"\d"))
    # The most urgent first; the live region names them all.
    expect(page.locator("#alert-list .alert")).to_have_count(2)
    assert page.locator("#alert-list .alert").first.get_attribute("data-name") == "workers_absent"
    expect(page.locator("#alerts-summary")).to_have_text("2 alerts: No workers, Queue backing up.")
    for job_id in ids:
        expect(row(page, job_id).locator(".badge")).to_have_text("queued")
        expect(row(page, job_id).locator(".stage")).to_have_text("waiting…")
    shoot(page, "dashboard-alerts.png")

    for job_id in ids:
        assert httpx.delete(f"{api.url}/v1/jobs/{job_id}", timeout=10).status_code == 200
        expect(row(page, job_id).locator(".badge")).to_have_text("cancelled")


def test_dashboard_on_a_narrow_screen(dash: dict[str, Api], browser: Browser) -> None:
    context = browser.new_context(viewport=NARROW, is_mobile=True)
    try:
        page = context.new_page()
        page.goto(f"{dash['live'].url}/dashboard")
        expect(page.locator("#conn")).to_have_attribute("data-mode", "stream")
        job_id = submit(dash["live"], {"steps": 10, "interval_ms": 30})
        expect(row(page, job_id).locator(".badge")).to_have_text("completed")
        expect(row(page, job_id).locator(".stage")).to_be_visible()  # stacked, not cut off
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= NARROW["width"], "the page scrolls sideways on a phone"
        shoot(page, "dashboard-narrow.png")
    finally:
        context.close()


def test_the_type_table_scrolls_sideways_on_a_phone_and_says_so(
    dash: dict[str, Api], browser: Browser
) -> None:
    """Bug: on a 390 px phone the per-type table's last columns were cut off, with nothing
    to say that it scrolls sideways."""
    context = browser.new_context(viewport=NARROW, is_mobile=True)
    try:
        page = context.new_page()
        page.goto(f"{dash['live'].url}/dashboard")
        expect(page.locator("#conn")).to_have_attribute("data-mode", "stream")
        job_id = submit(dash["live"], {"steps": 2, "interval_ms": 10})
        expect(row(page, job_id).locator(".badge")).to_have_text("completed")
        expect(page.locator('#types-body tr[data-type="ticker"]')).to_be_visible()

        wrap = page.locator("#types").locator("xpath=..")
        expect(wrap).to_have_css("overflow-x", "auto")
        assert wrap.evaluate("w => w.scrollWidth > w.clientWidth"), "nothing to scroll"
        cue = page.locator("#types-cue")
        cue.scroll_into_view_if_needed()
        expect(cue).to_be_visible()
        expect(cue).to_have_text("Scroll sideways for more columns")
        shoot(page, "dashboard-narrow-types.png")
        wrap.evaluate("w => { w.scrollLeft = w.scrollWidth; }")  # read to the last column
        expect(cue).to_be_hidden()
        wrap.scroll_into_view_if_needed()
        expect(page.locator("#types thead th").last).to_be_in_viewport()
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= NARROW["width"], "the page scrolls sideways on a phone"
    finally:
        context.close()


# ---- fallback and keys ----


@pytest.mark.timeout(90)
def test_a_job_that_ends_before_the_jobs_stream_starts_is_listed(
    redis_server: RedisServer, page: Page
) -> None:
    """Bug: a job made after the dashboard's first list and ended before its stream of all
    jobs started was in neither (the stream starts with the active jobs): the list was
    taken again only once the stream sent something, and with no job active it sent
    nothing. Here the job is made and cancelled while the stream's request is held."""
    api = Api([], console_env(redis_server.url, f"d{secrets.token_hex(3)}")).start()
    ended: list[str] = []

    def end_a_job_first(route: Route) -> None:
        if not ended:  # no worker: the queued job is cancelled at once
            job_id = submit(api, {"steps": 1, "interval_ms": 10})
            assert httpx.delete(f"{api.url}/v1/jobs/{job_id}", timeout=10).status_code == 200
            ended.append(job_id)
        route.continue_()

    try:
        page.route(re.compile(r"/v1/events"), end_a_job_first)
        page.goto(f"{api.url}/dashboard")
        expect(page.locator("#recent-note")).to_have_attribute("data-mode", "stream")
        assert ended, "the stream was never asked for"
        expect(row(page, ended[0]).locator(".badge")).to_have_text("cancelled")
    finally:
        api.stop()


def test_dashboard_polls_stats_while_the_stream_fails(dash: dict[str, Api], page: Page) -> None:
    """The stats stream answers 503 (here: the browser is told so): GET /v1/stats instead."""
    api = dash["live"]
    page.route(
        re.compile(r"/v1/stats/events"),
        lambda route: route.fulfill(
            status=503,
            content_type="application/json",
            body='{"error": {"code": "unavailable", "message": "no stream today"}}',
        ),
    )
    requests = record(page)
    page.goto(f"{api.url}/dashboard")
    expect(page.locator("#conn")).to_have_attribute("data-mode", "polling")
    expect(page.locator("#conn-label")).to_contain_text("Polling")
    expect(value(page, "workers")).to_have_text("1")
    before = overall(api)["completed"]
    job_id = submit(api, {"steps": 2, "interval_ms": 30})
    expect(row(page, job_id).locator(".badge")).to_have_text("completed")  # jobs still stream
    expect(value(page, "completed")).to_have_text(str(before + 1))
    assert requests.count("/v1/stats") >= 2, requests  # polled, more than once
    assert requests.count("/v1/stats/events") == 1, requests  # tried once, not hammered


def test_dashboard_asks_for_an_api_key_and_shows_only_that_tenants_jobs(
    stack: dict[str, Any], page: Page
) -> None:
    api: Api = stack["api"]
    page.goto(f"{api.url}/dashboard")
    key_field = page.get_by_label("API key")
    expect(key_field).to_be_visible()  # refused without a key: the key panel opened
    expect(page.locator("#conn")).to_have_attribute("data-mode", "offline")
    key_field.fill("key-p")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#conn")).to_have_attribute("data-mode", "stream")
    expect(value(page, "workers")).not_to_have_text("–")

    mine = submit(api, {"steps": 3, "interval_ms": 30}, key="key-p")
    theirs = submit(api, {"steps": 3, "interval_ms": 30}, key="key-q")
    expect(row(page, mine).locator(".badge")).to_have_text("completed")
    expect(row(page, theirs)).to_have_count(0)
    assert page.evaluate("() => localStorage.getItem('pushsvc.apiKey')") == "key-p"

    page.reload()  # the console's stored key: the stream token comes with it
    expect(page.locator("#conn")).to_have_attribute("data-mode", "stream")
    expect(row(page, mine).locator(".badge")).to_have_text("completed")


# ---- model calls ----


def test_model_calls_show_by_type_and_model(dash: dict[str, Api], page: Page) -> None:
    live = dash["live"]
    priced = submit(live, {"prompt": "dashboard [[tokens:30]]"}, "generate")
    free = submit(live, {"prompt": "free [[tokens:5]]", "model": "free-2"}, "generate")
    page.goto(f"{live.url}/dashboard")
    fake = page.locator('#models-body tr[data-type="generate"][data-model="fake-1"]')
    expect(fake).to_be_visible(timeout=15000)
    cells = fake.locator("td")  # after the type: model, calls, TTFT p50, p95, tokens/s,
    expect(cells.nth(0)).to_have_text("fake-1")  # prompt and answer tokens, cost
    expect(cells.nth(1)).to_have_text(re.compile(r"^[1-9][0-9]*$"))
    expect(cells.nth(2)).to_have_text(re.compile(r"^[0-9]+ ms$|s$"))
    expect(cells.nth(4)).to_have_text(re.compile(r"^[0-9.]+$"))
    expect(cells.nth(6)).to_have_text(re.compile(r"^[0-9,]+$"))  # counted by the server
    expect(cells.nth(7)).to_have_text(re.compile(r"^\$[0-9]+\.[0-9]{2}$"))  # 30 tokens: cents
    other = page.locator('#models-body tr[data-type="generate"][data-model="free-2"]')
    expect(other.locator("td").nth(7)).to_have_text("–", timeout=15000)  # no price, no cost
    expect(page.locator("#models-empty")).to_be_hidden()
    for job_id in (priced, free):
        job = httpx.get(f"{live.url}/v1/jobs/{job_id}", timeout=10).json()
        assert job["status"] == "completed", job
    shoot(page, "dashboard-models.png")
