"""The chaos run's clients: streams that reconnect with ``Last-Event-ID``, a client that
leaves at random moments and resumes (on either API process), and a poller. Each
records what it saw in a ``WatchLog`` for the checks in ``check``."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

import httpx
from httpx_sse import SSEError, aconnect_sse

from ...backoff import Delays, ExponentialBackoff
from .invariants import CLOSED, CUT, GONE, NO_CONTENT, TERMINAL, Ending, Received, WatchLog

# Reconnect delays after an error: 0.25 s, doubling up to 2 s (EventSource: 2 s).
RECONNECT_BACKOFF = ExponentialBackoff(cap=2.0, base=0.25)
POLL_S = (0.6, 1.4)  # between two polls of one job
STOPS = frozenset({NO_CONTENT, GONE})  # answers after which no client reconnects


@dataclass(frozen=True)
class Api:
    """Where the watchers of one tenant connect: every API process, with its API key."""

    urls: tuple[str, ...]
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


class StreamWatcher:
    """One SSE client for the whole run of its stream, across connections.

    It connects to API ``home`` (or, with ``roam``, to a random one each time), resumes
    with the exact id it last received, and reconnects after errors and 5xx answers. With
    ``cut_s`` it also leaves each connection after a random time in that range. It stops
    after the server ends the stream (204 and 404 too), unless ``forever`` (the all-jobs
    stream, which never ends: the run cancels it).
    """

    def __init__(
        self,
        log: WatchLog,
        http: httpx.AsyncClient,
        api: Api,
        path: str,
        rng: random.Random,
        *,
        home: int = 0,
        roam: bool = False,
        cut_s: tuple[float, float] | None = None,
        forever: bool = False,
    ) -> None:
        self.log, self.http, self.api, self.path, self.rng = log, http, api, path, rng
        self.home, self.roam, self.cut_s, self.forever = home, roam, cut_s, forever
        self.last_id = ""  # the SSE id last received, resent exactly as Last-Event-ID
        self.opened = asyncio.Event()  # the first connection answered 200

    async def run(self) -> None:
        delays, conn = Delays(RECONNECT_BACKOFF), 0
        while True:
            url = self.api.urls[self._target()] + self.path
            try:
                how = await self._connect(conn, url)
            except (httpx.HTTPError, SSEError) as exc:  # refused, reset, cut mid-chunk
                how = f"error: {type(exc).__name__}"
            self.log.endings.append(Ending(conn, how, time.time()))
            conn += 1
            if self._stops(how):
                self.log.done_at = time.time()
                return
            if how in (CLOSED, CUT):
                delays.reset()
                await asyncio.sleep(self.rng.uniform(0, 0.5))
            else:
                await asyncio.sleep(delays.next())

    def _stops(self, how: str) -> bool:
        if how in STOPS or (how.startswith("http 4") and how != "http 429"):
            return True  # a client error: retrying the same request cannot help
        return how == CLOSED and not self.forever

    def _target(self) -> int:
        return self.rng.randrange(len(self.api.urls)) if self.roam else self.home

    async def _connect(self, conn: int, url: str) -> str:
        headers = dict(self.api.headers)
        if self.last_id:
            headers["Last-Event-ID"] = self.last_id
        cut = self.rng.uniform(*self.cut_s) if self.cut_s else None
        try:
            async with asyncio.timeout(cut):
                async with aconnect_sse(self.http, "GET", url, headers=headers) as source:
                    status = source.response.status_code
                    if status != 200:
                        return {204: NO_CONTENT, 404: GONE}.get(status, f"http {status}")
                    self.opened.set()
                    async for sse in source.aiter_sse():
                        if sse.event == "queue":
                            continue  # volatile (no id): not part of the history judged
                        if sse.event == "message" and sse.data == "":
                            continue  # httpx-sse 0.4 turns heartbeat comments into these
                        self._record(conn, sse.id, sse.event, sse.data)
        except TimeoutError:
            return CUT
        return CLOSED

    def _record(self, conn: int, event_id: str, kind: str, raw: str) -> None:
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            data = {"unparsed": raw[:200]}  # the checks flag it: no job_id, seq, ts
        self.log.events.append(Received(conn, event_id, kind, data, time.time()))
        self.last_id = event_id


async def poll_job(
    log: WatchLog, http: httpx.AsyncClient, api: Api, job_id: str, rng: random.Random
) -> None:
    """GET the job from a random API about once a second until it ended or is gone."""
    while True:
        url = api.urls[rng.randrange(len(api.urls))]
        try:
            resp = await http.get(f"{url}/v1/jobs/{job_id}", headers=api.headers)
        except httpx.HTTPError:
            resp = None  # the API is down: poll again
        if resp is not None and resp.status_code == 200:
            body = resp.json()
            log.events.append(Received(0, resp.headers.get("etag", ""), "poll", body, time.time()))
            if body.get("status") in TERMINAL:
                log.done_at = time.time()
                return
        elif resp is not None and resp.status_code == 404:
            log.events.append(Received(0, "", "gone", {}, time.time()))
            log.done_at = time.time()
            return
        await asyncio.sleep(rng.uniform(*POLL_S))
