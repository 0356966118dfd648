"""The SSE response of the job streams: sse-starlette's, run lighter; the writes it makes
(``chunks``); and ``Drain``, which ends every open stream when the server shuts down."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Iterable, Iterator

import anyio
from sse_starlette import EventSourceResponse
from starlette.types import Message, Receive, Scope, Send

logger = logging.getLogger(__name__)
# Bytes per write of a stream. uvicorn waits for a paused transport *before* a write
# and then buffers all of it, so a client that stops reading makes the process hold the
# transport's high-water mark (64 KiB) plus one write: with a 10 MB snapshot written at
# once, 10 MB per stream. (The kernel's share is PUSHSVC_SEND_BUFFER_BYTES.)
SLICE_BYTES = 16384


def chunks(parts: Iterable[bytes]) -> Iterator[bytes]:
    """``parts`` as writes of about SLICE_BYTES: small ones joined, large ones in slices."""
    batch: list[bytes] = []
    size = 0
    for part in parts:
        if len(part) > SLICE_BYTES:
            if batch:
                yield b"".join(batch)
                batch, size = [], 0
            for at in range(0, len(part), SLICE_BYTES):
                yield part[at : at + SLICE_BYTES]
            continue
        batch.append(part)
        size += len(part)
        if size >= SLICE_BYTES:
            yield b"".join(batch)
            batch, size = [], 0
    if batch:
        yield b"".join(batch)


class Drain:
    """Ends the open streams of this process at shutdown, with one task for all of them.

    The watch is sse-starlette's own (its uvicorn shutdown signal); EventSourceResponse
    would run it once per stream.
    """

    def __init__(self) -> None:
        self._open: set[EventStream] = set()
        self._watcher: asyncio.Task[None] | None = None
        self.draining = False

    async def __aenter__(self) -> Drain:
        self._watcher = asyncio.create_task(self._watch(), name="pushsvc-drain")
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)

    async def _watch(self) -> None:
        await EventSourceResponse._listen_for_exit_signal()
        self.draining = True
        for stream in list(self._open):
            stream.stop()

    def add(self, stream: EventStream) -> None:
        self._open.add(stream)
        if self.draining:
            stream.stop()

    def discard(self, stream: EventStream) -> None:
        self._open.discard(stream)


class EventStream(EventSourceResponse):
    """sse-starlette's EventSourceResponse with one helper task per stream, not three.

    The library runs each response in an anyio task group: the stream, a disconnect
    listener and a shutdown listener. Since anyio 4.14 every task of a group carries a
    handle, a cancel scope and an event of its own: 13.3 KiB of the 40 KiB an open
    stream cost (tracemalloc, 2,000 streams). Here the library's stream loop runs in
    the request's own task inside one cancel scope, its disconnect listener in one
    plain task, and ``drain`` watches for shutdown once per process. Either cancels the
    scope, as the task group would: the body iterator is cancelled where it waits (and
    again at every wait until it ends), so its ``finally`` runs. Heartbeats are the
    body iterator's own (``ping`` is off).
    """

    FINAL_SEND_S = 1.0  # at shutdown, how long a client that reads nothing may hold us

    def __init__(self, content: AsyncIterable[bytes], drain: Drain, **kwargs: object) -> None:
        super().__init__(content, ping=0, **kwargs)  # type: ignore[arg-type]
        self._drain = drain
        self._scope = anyio.CancelScope()
        self._started = False

    def stop(self) -> None:
        """End the stream now (the client left, or the server is shutting down)."""
        self._scope.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "HEAD":
            await super().__call__(scope, receive, send)  # no stream to run
            return

        async def sending(message: Message) -> None:
            await send(message)
            self._started = True  # the response has begun (http.response.start went out)

        listener = asyncio.create_task(self._listen_for_disconnect(receive))
        listener.add_done_callback(self._listener_done)
        try:
            with self._scope:
                self._drain.add(self)
                await self._stream_response(sending)
        finally:
            self._drain.discard(self)
            listener.cancel()
        if self._scope.cancelled_caught and self.active and self._started:
            # The server is stopping and the client is still there: end the body
            # properly, so it reconnects (elsewhere) with Last-Event-ID.
            with anyio.move_on_after(self.FINAL_SEND_S):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        if self.background is not None:
            await self.background()

    def _listener_done(self, listener: asyncio.Task[None]) -> None:
        if not listener.cancelled() and listener.exception() is not None:
            logger.warning("SSE disconnect listener failed", exc_info=listener.exception())
        self.stop()
