"""A Python client for the v1 API (httpx + httpx-sse).

``Client.follow()`` streams one job's events: it resumes with ``Last-Event-ID`` after
a dropped connection (an API restart loses nothing), polls ``GET /v1/jobs/{id}`` when
the stream endpoint answers 503, and ends after the terminal event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
from httpx_sse import SSEError, aconnect_sse

from .backoff import EqualJitterBackoff, SpreadBackoff, floored
from .epoch import StreamPosition
from .errors import (
    ApiError,
    BadRequest,
    Conflict,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unauthorized,
    Unavailable,
    ValidationFailed,
)
from .models import TERMINAL

PROGRESS_FIELDS = ("progress", "stage", "message", "eta_s")
# Between stream reconnects: half to all of 0.1, 0.2, 0.4 .. 2 s.
RECONNECT = EqualJitterBackoff(cap=2.0, base=0.05)
_BY_STATUS: dict[int, type[ApiError]] = {
    e.status_code: e
    for e in (
        BadRequest,
        Unauthorized,
        NotFound,
        Conflict,
        PayloadTooLarge,
        ValidationFailed,
        Unavailable,
    )
}


@dataclass(frozen=True)
class Event:
    """One job event: ``id`` (the job's seq), ``kind`` and its JSON ``data``.

    ``source`` is ``"stream"``, or ``"poll"`` for events made from polled snapshots;
    ``epoch`` is the history ``id`` counts in (a new one comes with a reset snapshot).
    """

    id: int
    kind: str
    data: dict[str, Any]
    source: str = "stream"
    epoch: str = ""


def retry_after(resp: httpx.Response) -> float | None:
    try:
        return max(0.0, float(resp.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def api_error(resp: httpx.Response) -> ApiError:
    """The API's error answer as the exception the server raised (``errors.py``)."""
    try:
        body = resp.json().get("error") or {}
    except (ValueError, AttributeError):
        body = {}
    message = str(body.get("message") or f"HTTP {resp.status_code}")
    code, details = body.get("code"), body.get("details")
    err: ApiError
    if resp.status_code == 429:
        err = RateLimited(message, retry_after_s=int(retry_after(resp) or 1), details=details)
    else:
        err = _BY_STATUS.get(resp.status_code, ApiError)(message, details=details)
    if code:
        err.code = str(code)
    err.status_code = resp.status_code
    return err


# What an event carries besides the job's own fields: never part of the job.
_TRANSPORT = ("job_id", "ts", "reset", "polled")
# A new attempt starts afresh: the fields the worker resets as it starts one.
_FRESH_ATTEMPT = {"progress": 0.0, "stage": None, "message": None, "output": "", "eta_s": None}


def apply_event(job: dict[str, Any], kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """The job after one event, changed as the server's snapshot changes with it.

    The rules are the contract's ("To keep a job's state from a stream"), and
    ``tests/golden/events.json`` holds their cases: ``web/pushsvc.js``'s ``applyEvent``
    passes the same ones. No event carries ``started_at`` or ``finished_at``: the server
    stamps them as it publishes a new attempt's ``running`` and a final event, so they
    are taken from that event's ``ts``.
    """
    fields = {k: v for k, v in data.items() if k not in _TRANSPORT}
    if kind == "snapshot":
        return {**fields, "id": data["job_id"]}
    after = {**job, "id": data["job_id"], "seq": data["seq"]}
    if kind == "status":
        if _starts_attempt(job, fields):
            after.update(_FRESH_ATTEMPT, started_at=data.get("ts"))
            after.pop("retry_in_s", None)  # the wait it announced is over
        after.update(fields)
    elif kind == "progress":
        after.update({k: data.get(k) for k in PROGRESS_FIELDS})
    elif kind == "output":
        after["output"] = (job.get("output") or "") + data["delta"]
    elif kind in TERMINAL:
        ts = data.get("ts")
        after.update(_final(kind, data), finished_at=job.get("finished_at") if ts is None else ts)
    return after


def _starts_attempt(job: dict[str, Any], change: dict[str, Any]) -> bool:
    """A ``running`` status for a job that was not running: not a cancel request."""
    return (
        change.get("status") == "running"
        and job.get("status") != "running"
        and not change.get("cancel_requested")
    )


def _final(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """What a final event sets. ``completed`` drops an earlier attempt's error; ``failed``
    keeps the job's result unless it carries one (an end rebuilt from a snapshot does not)."""
    if kind == "completed":
        done = {"result": data.get("result"), "error": None, "progress": 100.0, "eta_s": 0.0}
        return {"status": kind, **done}
    if kind == "failed":
        failed = {"status": kind, "error": data.get("error"), "eta_s": None}
        if "result" in data:
            failed["result"] = data["result"]
        return failed
    return {"status": kind, "eta_s": None}


def diff_snapshots(prev: dict[str, Any] | None, job: dict[str, Any]) -> list[Event]:
    """The events that turn snapshot ``prev`` into ``job`` (for pollers).

    Like the server's, an attempt's ``running`` and a final event carry the moment they
    stand for (the job's ``started_at``, ``finished_at``) as ``ts``: ``apply_event``
    takes those times from it. Other polled events carry the poll's time.
    """
    seq = job["seq"]
    base = {"job_id": job["id"], "seq": seq, "ts": time.time()}
    status, output = job["status"], job.get("output") or ""
    ended = status in TERMINAL
    if prev is None or _rewound(prev, job):
        snapshot = {k: v for k, v in job.items() if k not in ("id", "links")}
        events = [Event(seq, "snapshot", {**base, **snapshot}, "poll")]
    else:
        events = []
        if status != prev.get("status") and not ended:
            ts = _stamp(job, "started_at", base) if status == "running" else base["ts"]
            data = {**base, "ts": ts, "status": status, "attempt": job.get("attempt")}
            events.append(Event(seq, "status", data, "poll"))
        shown = prev.get("output") or ""
        if len(output) > len(shown):
            events.append(Event(seq, "output", {**base, "delta": output[len(shown) :]}, "poll"))
        if any(job.get(k) != prev.get(k) for k in PROGRESS_FIELDS):
            data = {**base, **{k: job.get(k) for k in PROGRESS_FIELDS}}
            events.append(Event(seq, "progress", data, "poll"))
    if ended:
        events.append(Event(seq, status, _polled_end(job, base), "poll"))
    return events


def _stamp(job: dict[str, Any], field: str, base: dict[str, Any]) -> Any:
    """The job's own time ``field`` as an event's ``ts`` (the poll's when it has none)."""
    at = job.get(field)
    return base["ts"] if at is None else at


def _polled_end(job: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The final event of a polled job that ended: what the server's carries. A failed
    job may keep a partial result, which a poller that saw it running has not seen."""
    end = {**base, "ts": _stamp(job, "finished_at", base)}
    if job["status"] == "completed":
        return {**end, "result": job.get("result")}
    if job["status"] == "failed":
        return {**end, "error": job.get("error"), "result": job.get("result")}
    return end


def _rewound(prev: dict[str, Any], job: dict[str, Any]) -> bool:
    """A change events cannot express: a new attempt or run, or text that shrank."""
    return (
        job.get("attempt") != prev.get("attempt")
        or job.get("epoch", "") != prev.get("epoch", "")
        or (job.get("progress") or 0) < (prev.get("progress") or 0)
        or not (job.get("output") or "").startswith(prev.get("output") or "")
        or (prev.get("status") in TERMINAL and job["status"] not in TERMINAL)
    )


class _Tracker:
    """One job as seen so far: dedupes by seq and knows when it ended."""

    def __init__(self) -> None:
        self.job: dict[str, Any] | None = None
        self.seq = 0
        self.epoch = ""
        self.ended = False

    @property
    def position(self) -> StreamPosition | None:
        return StreamPosition(self.seq, self.epoch) if self.job is not None else None

    def accept(self, event: Event) -> bool:
        seq = int(event.data.get("seq", event.id))
        # A finished job's stream repeats its terminal event with the snapshot's seq.
        echo = event.kind in TERMINAL and not self.ended and seq == self.seq
        new_history = event.kind == "snapshot" and event.epoch != self.epoch
        seen = self.job is not None and seq <= self.seq
        if seen and not echo and not new_history and not self._lost_end(event):
            return False
        self.apply(event)
        return True

    def _lost_end(self, event: Event) -> bool:
        """The end of a job the store lost (``failed``, ``state_lost``), not seen yet: it
        counts whatever its seq, as in pushsvc.js. The API numbers it in a history that
        may have started again below what we saw; once the job ended, it is a duplicate."""
        error = event.data.get("error")
        lost = isinstance(error, dict) and error.get("code") == "state_lost"
        return event.kind == "failed" and lost and not self.ended

    def accept_snapshot(self, job: dict[str, Any]) -> list[Event]:
        """The events a polled snapshot brings (they share its seq: checked once, here)."""
        unseen_end = job["status"] in TERMINAL and not self.ended
        new_history = job.get("epoch", "") != self.epoch
        if self.job is not None and job["seq"] <= self.seq and not unseen_end and not new_history:
            return []
        events = diff_snapshots(self.job, job)
        for event in events:
            self.apply(event)
        self.epoch = job.get("epoch", "")
        return events

    def apply(self, event: Event) -> None:
        seq = int(event.data.get("seq", event.id))
        self.job = apply_event(self.job or {}, event.kind, event.data)
        self.seq = seq
        if event.epoch:
            self.epoch = event.epoch
        self.ended = event.kind in TERMINAL


class _StreamsOff(Exception):
    """The stream endpoint answered 503: poll instead."""


class Client:
    """The v1 API over httpx, as one tenant (``api_key``), or none on a keyless server."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        stream_read_timeout: float = 60.0,
        reconnect_for: float = 60.0,
        poll_min: float = 0.5,
        poll_max: float = 10.0,
        stream_retry: float = 30.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout)
        # Heartbeats arrive every PUSHSVC_HEARTBEAT_S; a longer silence is a dead connection.
        self.stream_timeout = httpx.Timeout(timeout, read=stream_read_timeout)
        self.reconnect_for = reconnect_for
        self.poll_min, self.poll_max, self.stream_retry = poll_min, poll_max, stream_retry

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _request_json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        resp = await self.http.request(method, path, **kwargs)
        if resp.is_error:
            raise api_error(resp)
        body: dict[str, Any] = resp.json()
        return body

    async def submit(
        self,
        type: str,
        payload: dict[str, Any],
        priority: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Submit a job; the answer is its snapshot with ``links``."""
        body: dict[str, Any] = {"type": type, "payload": payload}
        if priority is not None:
            body["priority"] = priority
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return await self._request_json("POST", "/v1/jobs", json=body, headers=headers)

    async def get(self, job_id: str) -> dict[str, Any]:
        return await self._request_json("GET", f"/v1/jobs/{job_id}")

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await self._request_json("DELETE", f"/v1/jobs/{job_id}")

    async def retry(self, job_id: str) -> dict[str, Any]:
        return await self._request_json("POST", f"/v1/jobs/{job_id}/retry")

    async def follow(self, job_id: str) -> AsyncGenerator[Event, None]:
        """The job's events once each, in order, until its terminal event."""
        seen = _Tracker()
        failing_since: float | None = None
        failures = 0
        while not seen.ended:
            try:
                async with contextlib.aclosing(self._stream(job_id, seen.position)) as events:
                    async for event in events:
                        failing_since, failures = None, 0
                        if seen.accept(event):
                            yield event
                        if seen.ended:
                            return
                # The server ended the stream early (shutting down): resume after a pause.
            except _StreamsOff:
                async with contextlib.aclosing(self._poll(job_id, seen)) as polled:
                    async for event in polled:
                        yield event
                continue
            except (httpx.TransportError, SSEError) as exc:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > self.reconnect_for:
                    raise ConnectionError(f"the stream of job {job_id} is gone") from exc
            failures += 1
            await asyncio.sleep(RECONNECT.compute(failures))

    async def _stream(
        self, job_id: str, last_id: StreamPosition | None
    ) -> AsyncGenerator[Event, None]:
        headers = {"Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-ID"] = str(last_id)
        url = f"/v1/jobs/{job_id}/events"
        async with aconnect_sse(
            self.http, "GET", url, headers=headers, timeout=self.stream_timeout
        ) as source:
            resp = source.response
            if resp.status_code == 204:
                raise _StreamsOff  # resumed after the end: one poll shows how it ended
            if resp.is_error:
                await resp.aread()
                if resp.status_code == 503:
                    raise _StreamsOff
                if resp.status_code >= 500:  # a proxy's 502 while the API restarts
                    raise httpx.RemoteProtocolError(f"HTTP {resp.status_code}")
                raise api_error(resp)
            async for sse in source.aiter_sse():
                if sse.event == "message" and sse.data == "":
                    continue  # httpx-sse turns heartbeat comments into these
                pos = StreamPosition.parse(sse.id) or StreamPosition(0)
                yield Event(pos.seq, sse.event, json.loads(sse.data), "stream", pos.epoch)

    async def _poll(self, job_id: str, seen: _Tracker) -> AsyncGenerator[Event, None]:
        """Poll with If-None-Match and backoff until the end, or until streams may be back."""
        etag: str | None = None
        gaps = SpreadBackoff(cap=self.poll_max, base=self.poll_min, spread=0.25)
        unchanged = 0  # polls in a row that found nothing new
        retry_stream_at = time.monotonic() + self.stream_retry
        while not seen.ended and time.monotonic() < retry_stream_at:
            changed, hint = False, None
            try:
                resp = await self.http.get(
                    f"/v1/jobs/{job_id}", headers={"If-None-Match": etag} if etag else {}
                )
                hint = retry_after(resp)
            except httpx.TransportError:
                resp = None
            if resp is not None and resp.status_code == 200:
                etag = resp.headers.get("etag")
                for event in seen.accept_snapshot(resp.json()):
                    changed = True
                    yield event
            elif resp is not None and resp.status_code < 500 and resp.status_code not in (304, 429):
                raise api_error(resp)
            if seen.ended:
                return
            unchanged = 0 if changed else unchanged + 1
            await asyncio.sleep(floored(gaps, unchanged, hint))
