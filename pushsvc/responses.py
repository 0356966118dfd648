"""The SSE response of the job streams: sse-starlette's, run lighter; the writes it makes
(``chunks``); ``Drain``, which ends every open stream when the server shuts down;
``JSONResponse`` (every JSON body ends with a newline); and ``json_response``, JSON
bodies with megabytes of text encoded a slice at a time."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterable, Coroutine, Generator, Iterable, Iterator, Mapping
from typing import Any

import anyio
from sse_starlette import EventSourceResponse
from sse_starlette.event import ensure_bytes
from starlette import responses as starlette
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

logger = logging.getLogger(__name__)
# Bytes per write of a stream. uvicorn waits for a paused transport *before* a write
# and then buffers all of it, so a client that stops reading makes the process hold the
# transport's high-water mark (64 KiB) plus one write: with a 10 MB snapshot written at
# once, 10 MB per stream. (The kernel's share is PUSHSVC_SEND_BUFFER_BYTES.)
SLICE_BYTES = 16384
# Where a request's scope carries the server's own ``send`` (app.py): a stream writes its
# body with it, past the middleware's wrappers, which look only at the response's start.
RAW_SEND = "pushsvc.raw_send"


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
    handle, a cancel scope and an event of its own: about a third of what an open
    stream cost in memory (BENCHMARKS.md). Here the library's stream loop runs in
    the request's own task inside one cancel scope, its disconnect listener in one
    plain task, and ``drain`` watches for shutdown once per process. Either cancels the
    scope, as the task group would: the body iterator is cancelled where it waits (and
    again at every wait until it ends), so its ``finally`` runs. Heartbeats are the
    body iterator's own (``ping`` is off). Each write is a plain ``send``: the library's
    loop puts every one in a cancel scope of its own for ``send_timeout``, which we do not
    set, and that scope cost as much CPU as the write.
    """

    FINAL_SEND_S = 1.0  # at shutdown, how long a client that reads nothing may hold us

    def __init__(self, content: AsyncIterable[bytes], drain: Drain, **kwargs: object) -> None:
        super().__init__(content, ping=0, **kwargs)  # type: ignore[arg-type]
        self._drain = drain
        self._scope = anyio.CancelScope()
        self._started = False
        self._send: Send | None = None  # for the body, once the response has started
        self._raw_send: Send | None = None
        self._inflight: asyncio.Future[None] | None = None  # a direct write that waits

    @property
    def writing(self) -> bool:
        """Is a direct write still waiting for the client to read?"""
        return self._inflight is not None

    def write_now(self, chunk: bytes) -> None:
        """Write ``chunk`` from outside the stream's task (streams.py ``_direct``).

        The send runs here, a step at a time: it returns at once unless the client's
        transport is paused (a slow reader), and then its rest runs in a task that the
        stream's own next write waits for, so writes stay in order and a slow reader
        holds one chunk here, as before. A send that fails ends the stream.
        """
        assert self._send is not None and self._inflight is None
        sending = self._send({"type": "http.response.body", "body": chunk, "more_body": True})
        if not isinstance(sending, Coroutine):  # not an ``async def`` send: run it as one
            self._inflight = rest = asyncio.ensure_future(sending)
            rest.add_done_callback(self._written)
            return
        try:
            blocker = sending.send(None)
        except StopIteration:
            return
        except Exception:
            logger.debug("a direct write failed; the stream ends", exc_info=True)
            self.stop()
            return
        self._inflight = rest = asyncio.ensure_future(_Resumed(sending, blocker))
        rest.add_done_callback(self._written)

    def _written(self, rest: asyncio.Future[None]) -> None:
        self._inflight = None
        if rest.cancelled() or rest.exception() is not None:
            self.stop()

    async def _wait_written(self) -> None:
        if self._inflight is not None:
            await asyncio.shield(self._inflight)

    def stop(self) -> None:
        """End the stream now (the client left, or the server is shutting down)."""
        self._scope.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "HEAD":
            await super().__call__(scope, receive, send)  # no stream to run
            return

        self._raw_send = scope.get(RAW_SEND, send)
        listener = asyncio.create_task(self._listen_for_disconnect(receive))
        listener.add_done_callback(self._listener_done)
        try:
            with self._scope:
                self._drain.add(self)
                await self._stream_response(send)
        finally:
            self._drain.discard(self)
            listener.cancel()
        if self._scope.cancelled_caught and self.active and self._started:
            # The server is stopping and the client is still there: end the body
            # properly, so it reconnects (elsewhere) with Last-Event-ID.
            with anyio.move_on_after(self.FINAL_SEND_S):
                await self._wait_written()
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif self._scope.cancelled_caught and not self._started:
            # Stopped before the stream had started (its headers wait for that): an
            # empty stream, not none, so a client still there reconnects (elsewhere).
            with anyio.move_on_after(self.FINAL_SEND_S):
                start = {"type": "http.response.start", "headers": self.raw_headers}
                await send({**start, "status": self.status_code})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        if self._inflight is not None:
            self._inflight.cancel()
        if self.background is not None:
            await self.background()

    async def _stream_response(self, send: Send) -> None:
        """The library's loop (sse_starlette 3.7), each write without a cancel scope."""
        if self.send_timeout is not None:  # not ours; the library's own, scopes and all
            await super()._stream_response(self._noting_start(send))
            return
        # The headers wait for the body's first chunk: a stream sends it once it has
        # started (subscribed, its position read), so a client that sees the stream open
        # (EventSource's ``open``) may list what it missed and miss nothing.
        body = aiter(self.body_iterator)
        try:
            first = await anext(body, None)
        except BaseException:
            await self._close_body()
            raise
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        self._response_started = self._started = True  # the response has begun
        self._send = send = self._raw_send or send
        if first is not None:
            await self._write(send, first)
        async for data in body:
            await self._write(send, data)
        async with self._send_lock:  # as the library: ``active`` flips after the send
            try:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except BaseException:
                self._send_interrupted = True
                raise
            self._response_complete = True
            self.active = False

    async def _write(self, send: Send, data: Any) -> None:
        """One chunk of the body, after any direct write still under way."""
        try:
            chunk = data if type(data) is bytes else ensure_bytes(data, self.sep)
            try:
                if self._inflight is not None:
                    await self._wait_written()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except BaseException:
                self._send_interrupted = True
                raise
        except BaseException:
            await self._close_body()  # its cleanup runs before the error leaves
            raise

    def _noting_start(self, send: Send) -> Send:
        async def sending(message: Message) -> None:
            await send(message)
            self._started = True  # the response has begun (http.response.start went out)

        return sending

    async def _close_body(self) -> None:
        """As the library does when a write or an encoding fails: close the body iterator
        (suspended at its yield), shielded, for at most ``cleanup_timeout`` s."""
        aclose = getattr(self.body_iterator, "aclose", None)
        if aclose is None:
            return
        with anyio.move_on_after(self._cleanup_timeout, shield=True) as cleanup:
            try:
                await aclose()
            except Exception:
                logger.exception("Error closing body iterator after encoding or send failure")
        if cleanup.cancel_called:
            logger.warning(
                "Body iterator cleanup cancelled after %s seconds", self._cleanup_timeout
            )

    def _listener_done(self, listener: asyncio.Task[None]) -> None:
        if not listener.cancelled() and listener.exception() is not None:
            logger.warning("SSE disconnect listener failed", exc_info=listener.exception())
        self.stop()


class _Resumed:
    """The rest of a coroutine that was stepped by hand and yielded ``blocker`` (a
    future it waits for): awaiting this runs it on from there, as its task would."""

    __slots__ = ("coro", "blocker")

    def __init__(self, coro: Coroutine[Any, Any, None], blocker: Any) -> None:
        self.coro, self.blocker = coro, blocker

    def __await__(self) -> Generator[Any, Any, None]:
        value = self.blocker
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # cancelled: into the coroutine, as a task does
                try:
                    value = self.coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    value = self.coro.send(sent)
                except StopIteration:
                    return


# -- JSON bodies ------------------------------------------------------------------------


class JSONResponse(starlette.JSONResponse):
    """Starlette's JSONResponse with a newline after the document, as a text file ends:
    ``curl`` output then does not run into the shell prompt. Every JSON body of the API
    is one of these (or ``json_response``'s slices, which end the same way)."""

    def render(self, content: Any) -> bytes:
        return super().render(content) + b"\n"


# -- JSON bodies with large text ---------------------------------------------------------

# A string this long (a job's output: up to megabytes) is encoded TEXT_SLICE characters
# at a time, other tasks running between slices: json.dumps of megabytes of text with
# quotes and newlines in one piece held the event loop long enough to show in the other
# tenants' latency (BENCHMARKS.md). The body goes out in writes of about PART_BYTES.
LARGE_TEXT = 65536
TEXT_SLICE = 131072
PART_BYTES = 262144


def _dumps(value: Any) -> str:
    """As Starlette's JSONResponse renders (without our newline)."""
    return json.dumps(
        value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    )


def _has_large(value: Any) -> bool:
    """Does ``value`` hold a string of LARGE_TEXT characters or more? (Asked of every
    JSON body: leaves are looked at in place, not through a call each.)"""
    kind = type(value)
    if kind is str:
        return len(value) >= LARGE_TEXT
    if kind is not dict and kind is not list:
        return False
    for item in value.values() if kind is dict else value:
        kind = type(item)
        if kind is str:
            if len(item) >= LARGE_TEXT:
                return True
        elif (kind is dict or kind is list) and _has_large(item):
            return True
    return False


def _lift(value: Any, large: list[str], tag: str) -> Any:
    """``value`` with each long string replaced by ``tag`` and its index in ``large``,
    in the order json.dumps meets them."""
    if type(value) is str:
        if len(value) < LARGE_TEXT:
            return value
        large.append(value)
        return f"{tag}{len(large) - 1}"
    if type(value) is dict:
        return {k: _lift(v, large, tag) for k, v in value.items()}
    if type(value) is list:
        return [_lift(v, large, tag) for v in value]
    return value


class JSONParts(Response):
    """A JSON body encoded ahead in parts (bytes), sent one write per part."""

    media_type = "application/json"

    def __init__(
        self, parts: list[bytes], status_code: int = 200, headers: Mapping[str, str] | None = None
    ) -> None:
        self.parts = parts
        # The headers JSONResponse would send, in its order: the caller's, then the length.
        size = str(sum(len(p) for p in parts))
        super().__init__(None, status_code, {**(headers or {}), "content-length": size})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        last = len(self.parts) - 1
        for i, part in enumerate(self.parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < last})
        if self.background is not None:
            await self.background()


async def json_response(
    content: Any, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """:class:`JSONResponse`, the same bytes; a body with long strings (LARGE_TEXT) is
    encoded TEXT_SLICE characters at a time, yielding to other tasks in between."""
    if not _has_large(content):
        return JSONResponse(content, status_code, headers)
    large: list[str] = []
    tag = f"\x00{secrets.token_hex(8)}:"  # no text the body holds (64 random bits)
    rest = _dumps(_lift(content, large, tag))
    pieces: list[bytes] = []
    for i, text in enumerate(large):
        head, found, rest = rest.partition(_dumps(f"{tag}{i}"))
        assert found, "a lifted string is missing from its skeleton"
        pieces.append(f'{head}"'.encode())
        for at in range(0, len(text), TEXT_SLICE):
            await asyncio.sleep(0)
            pieces.append(_dumps(text[at : at + TEXT_SLICE])[1:-1].encode())
        pieces.append(b'"')
    pieces.append(rest.encode() + b"\n")
    return JSONParts(_parts(pieces), status_code, headers)


def _parts(pieces: list[bytes]) -> list[bytes]:
    """``pieces`` joined into writes of at least PART_BYTES (the last may be smaller)."""
    parts: list[bytes] = []
    batch: list[bytes] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece)
        if size >= PART_BYTES:
            parts.append(b"".join(batch))
            batch, size = [], 0
    if batch or not parts:
        parts.append(b"".join(batch))
    return parts
