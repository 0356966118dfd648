"""The stream response (pushsvc/responses.py): what an open stream costs, how it ends."""

from __future__ import annotations

import asyncio
import secrets
import signal
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.types import Message

from pushsvc.responses import SLICE_BYTES, Drain, EventStream, chunks

from .conftest import stack_env
from .procs import Api, RedisServer
from .sse import events, settled

KEY = {"Authorization": "Bearer key-a"}


@pytest.fixture
async def api(redis_server: RedisServer) -> AsyncIterator[tuple[Api, httpx.AsyncClient]]:
    """An API of its own and no worker: submitted jobs stay queued, their streams open."""
    api = Api([], stack_env(redis_server.url, f"r{secrets.token_hex(3)}")).start()
    http = httpx.AsyncClient(base_url=api.url, headers=KEY, timeout=10)
    yield api, http
    await http.aclose()
    api.stop()


async def _hold(http: httpx.AsyncClient, path: str, seen: list[Any]) -> None:
    async for event in events(http, path):
        seen.append(event)


async def _job(http: httpx.AsyncClient) -> str:
    resp = await http.post("/v1/jobs", json={"type": "ticker", "payload": {"steps": 5}})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


@pytest.mark.timeout(60)
async def test_an_open_stream_costs_at_most_two_tasks(api: tuple[Api, httpx.AsyncClient]) -> None:
    """Regression: each stream ran in an anyio task group of three tasks besides the
    request's own (sse-starlette's), which with anyio 4.14+ cost 13.3 KiB a stream."""
    _, http = api
    job_id = await _job(http)
    before = (await settled(http, 0))["pushsvc_asyncio_tasks"]
    seen: list[Any] = []
    paths = [f"/v1/jobs/{job_id}/events", f"/v1/events?job={job_id}", "/v1/events"]
    readers = [asyncio.create_task(_hold(http, paths[i % 3], seen)) for i in range(30)]
    try:
        # Every stream sent its snapshot (a stream counts as open a moment before that).
        async with asyncio.timeout(20):
            while len(seen) < 30:
                await asyncio.sleep(0.01)  # our own readers' list, filled by their tasks
        during = (await settled(http, 30))["pushsvc_asyncio_tasks"]
        assert during - before <= 2 * 30
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    after = (await settled(http, 0, tasks_at_most=before))["pushsvc_asyncio_tasks"]
    assert after <= before  # the listeners went with their streams


@pytest.mark.timeout(60)
async def test_sigterm_ends_open_streams_and_the_api_exits(
    api: tuple[Api, httpx.AsyncClient],
) -> None:
    """The server's shutdown ends every open stream with a complete response, so the
    process exits (uvicorn waits for open connections) and clients reconnect elsewhere."""
    proc, http = api
    job_id = await _job(http)
    seen: list[Any] = []
    readers = [
        asyncio.create_task(_hold(http, f"/v1/jobs/{job_id}/events", seen)) for _ in range(5)
    ]
    await settled(http, 5)
    assert proc.proc is not None
    proc.signal(signal.SIGTERM)
    ended = await asyncio.wait_for(asyncio.gather(*readers, return_exceptions=True), 15)
    assert ended == [None] * 5  # each stream ended cleanly, none was cut
    # uvicorn re-raises the signal once it has shut down gracefully
    assert await asyncio.to_thread(proc.proc.wait, 15) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in proc.output()
    assert [e.kind for e in seen] == ["snapshot"] * 5


@pytest.mark.timeout(30)
async def test_head_on_a_stream_answers_headers_and_no_body(
    api: tuple[Api, httpx.AsyncClient],
) -> None:
    _, http = api
    job_id = await _job(http)
    resp = await http.head(f"/v1/jobs/{job_id}/events")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.content == b""
    assert (await settled(http, 0))["pushsvc_open_streams"] == 0  # nothing left open


class _Asgi:
    """The server side of one request: ``receive`` answers a disconnect when told."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.body_started = asyncio.Event()
        self.leave = asyncio.Event()
        self.scope = {"type": "http", "method": "GET", "path": "/", "headers": []}

    async def receive(self) -> Message:
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body":
            self.body_started.set()


@pytest.mark.timeout(10)
async def test_a_stop_the_body_swallows_is_delivered_again() -> None:
    """Regression: ``stop()`` sent one ``Task.cancel()``; a body that swallowed it (as
    3.11's ``wait_for`` does when its future completes in the same turn) went on after
    its client left, and shutdown then waited for it forever."""
    swallowed = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal swallowed
        yield b"retry: 1000\n\n"
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1

    asgi = _Asgi()
    async with Drain() as drain:
        call = asyncio.create_task(EventStream(body(), drain)(asgi.scope, asgi.receive, asgi.send))
        await asgi.body_started.wait()
        asgi.leave.set()
        await asyncio.wait_for(call, 5)
    assert swallowed == 1


@pytest.mark.timeout(10)
async def test_a_stream_opened_while_draining_ends_at_once_with_a_complete_body() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"retry: 1000\n\n"
        await asyncio.sleep(3600)

    asgi = _Asgi()
    async with Drain() as drain:
        drain.draining = True  # what the shutdown signal does
        await asyncio.wait_for(EventStream(body(), drain)(asgi.scope, asgi.receive, asgi.send), 5)
    assert asgi.sent[0]["type"] == "http.response.start"
    assert asgi.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


def test_writes_join_small_frames_and_slice_large_ones() -> None:
    """A large frame goes out in slices (a reader that stops holds one, not the frame);
    small frames go out together; the bytes and their order are kept."""
    small, large = [b"a" * 100, b"b" * 200], b"c" * (3 * SLICE_BYTES + 5)
    writes = list(chunks([*small, large, b"d" * 10]))
    assert b"".join(writes) == b"".join([*small, large, b"d" * 10])
    assert writes[0] == b"".join(small)
    assert [len(w) for w in writes[1:]] == [SLICE_BYTES] * 3 + [5, 10]
    many = list(chunks([b"e" * 1000] * 100))  # 100 KB of small frames
    assert all(len(w) < 2 * SLICE_BYTES for w in many) and len(many) > 1
