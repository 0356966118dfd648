"""Tabs share one stream (pushsvc.js's TabLink): eight tabs of one browser hold one
``/v1/events`` connection, every tab gets every event, closing the leader tab loses
nothing, and a browser without BroadcastChannel and Web Locks streams per tab.

Each tab is a page of one browser context on the API's origin (``/healthz``: no page
script of its own) that imports pushsvc.js and records what its watcher applies.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Error, Page, Request

from ..procs import Api, Proc, RedisServer, wait_until
from .test_web import console_env, typewriter_text

pytestmark = pytest.mark.timeout(120)

# Start a watcher in the tab; window.got keeps each job as the watcher knows it and the
# events it applied, in order. Resolves once the tab knows whether it leads.
WATCH = """
async ([ids, options]) => {
  const lib = await import("/static/pushsvc.js");
  window.got = {jobs: {}, events: [], modes: []};
  const keep = (job, ev) => {
    window.got.jobs[job.id] = {status: job.status, output: job.output, progress: job.progress};
    window.got.events.push([ev.kind, ev.job_id, ev.seq]);
  };
  const handlers = {snapshot: keep, status: keep, progress: keep, output: keep, done: keep,
                    mode: (m) => window.got.modes.push(m)};
  window.handle = lib.watchJobs(ids === null ? "all" : ids, handlers,
                                {storageKey: false, ...options});
  const start = Date.now();
  while (window.handle.sharing === "joining" && Date.now() - start < 10000) {
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return window.handle.sharing;
}
"""

# Deleted before any script runs: a browser without either API.
NO_SHARING = "delete window.BroadcastChannel; delete Navigator.prototype.locks;"


@pytest.fixture(scope="module")
def api(redis_server: RedisServer) -> Iterator[Api]:
    """A keyless API of its own (its /metrics counts only these tabs' streams), a worker."""
    env = console_env(redis_server.url, f"tabs{secrets.token_hex(3)}")
    worker = Proc(["worker"], env).start()
    api = Api([], env).start()
    yield api
    api.stop()
    worker.stop()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context()
    context.set_default_timeout(30_000)
    yield context
    context.close()


def open_streams(api: Api) -> int:
    text = httpx.get(f"{api.url}/metrics", timeout=10).text
    found = re.search(r"^pushsvc_open_streams (\S+)$", text, re.MULTILINE)
    assert found, text
    return int(float(found.group(1)))


def submit(api: Api, words: int, interval_ms: int) -> str:
    payload = {"words": words, "interval_ms": interval_ms}
    resp = httpx.post(f"{api.url}/v1/jobs", json={"type": "typewriter", "payload": payload})
    assert resp.status_code == 202, resp.text
    job_id: str = resp.json()["id"]
    return job_id


def open_tabs(
    context: BrowserContext, api: Api, watches: list[list[str] | None], **options: Any
) -> list[Page]:
    """One tab per entry of ``watches`` (job ids, or None: all jobs), each watching."""
    tabs = []
    for ids in watches:
        tab = context.new_page()
        tab.goto(f"{api.url}/healthz")
        tab.evaluate(WATCH, [ids, options])
        tabs.append(tab)
    return tabs


def roles(tabs: list[Page]) -> list[str]:
    return [tab.evaluate("() => window.handle.sharing") for tab in tabs]


def leader_of(tabs: list[Page]) -> Page:
    wait_until(lambda: sorted(roles(tabs)).count("leading") == 1, 20, "one leading tab")
    return tabs[roles(tabs).index("leading")]


def wait_done(tab: Page, job_ids: list[str]) -> None:
    tab.wait_for_function(
        "(ids) => ids.every((id) => window.got.jobs[id]?.status === 'completed')",
        arg=job_ids,
        timeout=40_000,
    )


def progressed(tab: Page, job_ids: list[str], pct: int) -> None:
    tab.wait_for_function(
        "([ids, pct]) => ids.every((id) => (window.got.jobs[id]?.progress ?? 0) >= pct)",
        arg=[job_ids, pct],
    )


def jobs_of(tab: Page) -> dict[str, dict[str, Any]]:
    jobs: dict[str, dict[str, Any]] = tab.evaluate("() => window.got.jobs")
    return jobs


def events_of(tab: Page, job_ids: list[str]) -> list[list[Any]]:
    events: list[list[Any]] = tab.evaluate("() => window.got.events")
    return [e for e in events if e[1] in job_ids]


def stream_opens(context: BrowserContext) -> list[str]:
    """The URL of every ``/v1/events`` request the context's tabs make from now on."""
    urls: list[str] = []

    def note(request: Request) -> None:
        if "/v1/events" in request.url:
            urls.append(request.url)

    context.on("request", note)
    return urls


def crash(tab: Page) -> None:
    """Kill the tab's renderer: no pagehide, no bye (a crash, an OOM kill)."""
    cdp = tab.context.new_cdp_session(tab)
    with contextlib.suppress(Error):  # no answer comes: the renderer is gone
        cdp.send("Page.crash", timeout=2000)


def status_of(api: Api, job_id: str) -> str:
    status: str = httpx.get(f"{api.url}/v1/jobs/{job_id}", timeout=10).json()["status"]
    return status


def test_eight_tabs_hold_one_stream_and_each_gets_every_event(
    api: Api, context: BrowserContext
) -> None:
    opens = stream_opens(context)
    tabs = open_tabs(context, api, [None] * 8)
    leader_of(tabs)
    assert sorted(roles(tabs)) == ["following"] * 7 + ["leading"]
    wait_until(lambda: open_streams(api) == 1, 20, "one open stream")
    # Followers that come are synced from the stream already open (not a reopen each).
    assert 1 <= len(opens) <= 2, opens

    words = 30
    ids = [submit(api, words, 40) for _ in range(3)]
    for tab in tabs:
        wait_done(tab, ids)
    assert open_streams(api) == 1
    leaders = [tab for tab, role in zip(tabs, roles(tabs), strict=True) if role == "leading"]
    expected = events_of(leaders[0], ids)
    for tab in tabs:
        jobs = jobs_of(tab)
        assert [jobs[i]["output"] for i in ids] == [typewriter_text(words)] * 3
        # The same frames, in the same order, in every tab: the leader's stream, relayed.
        assert events_of(tab, ids) == expected


def test_closing_the_leader_mid_stream_loses_nothing(api: Api, context: BrowserContext) -> None:
    """The next tab takes the lock and resumes after the last id relayed."""
    tabs = open_tabs(context, api, [None] * 8)
    leader = leader_of(tabs)
    words = 70
    ids = [submit(api, words, 50) for _ in range(2)]
    for tab in tabs:
        progressed(tab, ids, 20)
    leader.close()
    tabs.remove(leader)

    leader_of(tabs)  # one of the others leads now
    for tab in tabs:
        wait_done(tab, ids)
        jobs = jobs_of(tab)
        assert [jobs[i]["output"] for i in ids] == [typewriter_text(words)] * 2
        seqs = [e[2] for e in events_of(tab, ids[:1])]
        assert seqs == sorted(seqs), seqs  # no event applied twice, none out of order
    wait_until(lambda: open_streams(api) == 1, 20, "one open stream")


def test_tabs_watching_different_jobs_share_one_stream(api: Api, context: BrowserContext) -> None:
    """Named jobs: the leader streams every tab's jobs; each tab takes its own, whole, and
    still does when the leader tab closes mid-stream."""
    words = 60
    ids = [submit(api, words, 50) for _ in range(4)]
    tabs = open_tabs(context, api, [[job_id] for job_id in ids])
    leader = leader_of(tabs)
    wait_until(lambda: open_streams(api) == 1, 20, "one open stream")
    for tab, job_id in zip(tabs, ids, strict=True):
        progressed(tab, [job_id], 15)
    leader.close()
    rest = [(tab, job_id) for tab, job_id in zip(tabs, ids, strict=True) if tab is not leader]
    leader_of([tab for tab, _ in rest])
    for tab, job_id in rest:
        wait_done(tab, [job_id])
        jobs = jobs_of(tab)
        assert list(jobs) == [job_id]  # only its own job, though the stream carried all
        assert jobs[job_id]["output"] == typewriter_text(words)
    wait_until(lambda: open_streams(api) == 0, 20, "the stream closed: every job ended")


def test_without_broadcast_channel_and_locks_each_tab_streams(
    api: Api, context: BrowserContext
) -> None:
    context.add_init_script(NO_SHARING)
    tabs = open_tabs(context, api, [None] * 3)
    assert roles(tabs) == ["own"] * 3
    wait_until(lambda: open_streams(api) == 3, 20, "a stream per tab")
    ids = [submit(api, 20, 30)]
    for tab in tabs:
        wait_done(tab, ids)
        assert jobs_of(tab)[ids[0]]["output"] == typewriter_text(20)


def test_when_the_leader_cannot_stream_every_tab_polls(api: Api, context: BrowserContext) -> None:
    """Streams off: the leader falls back to polling and says so; each follower then polls
    for its own jobs, and all end whole."""
    off = Api([], {**api.env, "PUSHSVC_STREAMS_ENABLED": "false"}).start()
    try:
        words = 20
        ids = [submit(off, words, 40) for _ in range(3)]
        tabs = open_tabs(context, off, [[job_id] for job_id in ids], pollMinMs=200)
        leader_of(tabs)
        for tab, job_id in zip(tabs, ids, strict=True):
            wait_done(tab, [job_id])
            assert jobs_of(tab)[job_id]["output"] == typewriter_text(words)
            modes = tab.evaluate("() => window.got.modes")
            assert modes and set(modes) == {"polling"}, modes
    finally:
        off.stop()


def test_a_follower_rides_out_an_api_restart_with_its_leader(
    api: Api, context: BrowserContext
) -> None:
    """Bug: while the leader's stream reconnected by itself (unreachable), followers fell
    back to polling and then asked for a fresh stream, which cannot end a job the
    restarted store lost (404 instead of the resumed stream's ``state_lost``). Now they
    say "unreachable" and keep to the relay, which resumes with the leader's stream."""
    first = Api([], api.env).start()
    second: Api | None = None
    try:
        words = 60
        job_id = submit(first, words, 70)
        tabs = open_tabs(context, first, [[job_id], [job_id]])
        leader = leader_of(tabs)
        follower = tabs[1 - tabs.index(leader)]
        progressed(follower, [job_id], 15)
        first.stop()
        follower.wait_for_function("() => window.got.modes.includes('unreachable')")
        second = Api([], api.env, port=first.port).start()
        for tab in tabs:
            wait_done(tab, [job_id])
            assert jobs_of(tab)[job_id]["output"] == typewriter_text(words)
        modes = {tab: tab.evaluate("() => window.got.modes") for tab in tabs}
        # It polls only when its leader does (after too many stream errors in a row).
        assert "polling" not in modes[follower] or "polling" in modes[leader], modes
        assert modes[follower][-1] == "stream", modes
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_tabs_joining_mid_job_reuse_the_stream_and_miss_nothing(
    api: Api, context: BrowserContext
) -> None:
    """Eight tabs watching one running job: the leader keeps its stream; each newcomer
    GETs the job and applies what was relayed meanwhile after it, nothing lost or twice."""
    words = 80
    job_id = submit(api, words, 50)
    opens = stream_opens(context)
    tabs = open_tabs(context, api, [[job_id]] * 8)
    leader_of(tabs)
    for tab in tabs:
        wait_done(tab, [job_id])
        assert jobs_of(tab)[job_id]["output"] == typewriter_text(words)
        seqs = [e[2] for e in events_of(tab, [job_id]) if e[0] != "done"]
        assert seqs == sorted(set(seqs)), seqs  # none applied twice, none out of order
    assert 1 <= len(opens) <= 3, opens  # one per tab before: eight


def test_a_follower_gone_without_a_word_is_forgotten(api: Api, context: BrowserContext) -> None:
    """A follower that crashes says no bye: it stops answering the leader's pings and is
    forgotten; the leader, its own job done, lets go of the stream though the dead tab's
    job still runs."""
    short, long = submit(api, 3, 20), submit(api, 400, 100)
    tabs = open_tabs(context, api, [[short], [long]], tabPingMs=300)
    leader = leader_of(tabs)
    assert tabs.index(leader) == 0
    wait_done(leader, [short])
    progressed(tabs[1], [long], 1)
    wait_until(lambda: open_streams(api) == 1, 20, "the stream, for the follower's job")
    crash(tabs[1])
    wait_until(lambda: open_streams(api) == 0, 20, "the leader let go of the stream")
    assert status_of(api, long) == "running"
    assert leader.evaluate("() => window.handle.sharing") == "leading"
    httpx.delete(f"{api.url}/v1/jobs/{long}", timeout=10)


def test_a_dead_followers_job_is_dropped_when_it_ends(api: Api, context: BrowserContext) -> None:
    """Pings far apart: the crashed follower is not forgotten yet, but its job's final
    frame, relayed, ends it for every tab: the leader's next stream does not name it."""
    short, other = submit(api, 3, 20), submit(api, 60, 60)
    tabs = open_tabs(context, api, [[short], [other]], tabPingMs=600_000)
    leader = leader_of(tabs)
    wait_done(leader, [short])
    progressed(tabs[1], [other], 1)
    crash(tabs[1])
    wait_until(lambda: status_of(api, other) == "completed", 30, "the dead tab's job ended")
    wait_until(lambda: open_streams(api) == 0, 20, "the stream ended with the jobs")
    third = submit(api, 5, 20)
    with context.expect_event("request", lambda r: "/v1/events" in r.url) as stream:
        leader.evaluate("(id) => window.handle.add(id)", third)
    assert parse_qs(urlsplit(stream.value.url).query)["job"] == [third]
    wait_done(leader, [third])
