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
from .job_view import Event, JobTracker

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
        seen = JobTracker()
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

    async def _poll(self, job_id: str, seen: JobTracker) -> AsyncGenerator[Event, None]:
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
