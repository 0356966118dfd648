"""A light SSE reader for benches with a thousand streams: one ``asyncio.Protocol`` per
stream, a hand-written HTTP/1.1 GET, and events handed on as raw ``(kind, data)`` text.

Why not httpx + httpx-sse (``clients.read_stream``): the load generator stands for
browsers on other machines, so its CPU should go on reading, not on a client stack. Here
each read is parsed in ``data_received`` (no task wakes per read, no JSON); the caller
parses only the events, and the parts of them, it needs. Kept to what our API sends:
HTTP/1.1, a chunked or a close-delimited body, ``\\n`` or ``\\r\\n`` line ends (a lone
``\\r``, which the SSE spec also allows, is not one), no reconnection (``id:`` and
``retry:`` are read past).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from .stack import BenchError

CONNECT_S = 30.0
IDLE_S = 30.0  # no byte over a whole window: an error (our API sends a ping every 15 s)
MAX_HEAD = 64 * 1024  # status line and headers
MAX_LINE = 1024  # a chunk-size line
MAX_EVENT = 32 * 1024 * 1024  # an event's text, unfinished
HEX = b"0123456789abcdefABCDEF"
# An event as our API writes it (frames.py): what the line-by-line parse would make of it.
USUAL = re.compile(rb"(?:id: [^\n]*\n)?event: ([^\n]*)\ndata: ([^\n]*)")

OnEvent = Callable[[str, str], None]


class Chunked:
    """A chunked body (RFC 9112 7.1) fed in pieces of any size: ``feed`` returns the data
    they complete; ``ended`` once the last (empty) chunk came. Trailers are not read."""

    def __init__(self) -> None:
        self.ended = False
        self._rest = b""  # an unfinished size line or chunk end
        self._left = 0  # bytes of the current chunk still to come
        self._crlf = False  # the current chunk's data is in; its CRLF is next

    def feed(self, data: bytes) -> bytes:
        buf = self._rest + data if self._rest else data
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while pos < end and not self.ended:
            if self._left:
                take = min(self._left, end - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._left -= take
                self._crlf = not self._left
            elif self._crlf:
                if end - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise BenchError(f"chunked body: no CRLF after a chunk: {buf[pos:][:40]!r}")
                pos += 2
                self._crlf = False
            else:
                line_end = buf.find(b"\r\n", pos)
                if line_end < 0:
                    if end - pos > MAX_LINE:
                        raise BenchError(f"chunked body: no chunk size in {buf[pos:][:40]!r}")
                    break
                self._left = chunk_size(buf[pos:line_end])
                self.ended = not self._left
                pos = line_end + 2
        self._rest = buf[pos:]
        return b"".join(out)


def chunk_size(line: bytes) -> int:
    """A chunk-size line's size (hex, extensions after ``;`` ignored)."""
    digits = line.partition(b";")[0].strip()
    if not digits or digits.strip(HEX) or len(digits) > 16:  # int() would take "0x1_0"
        raise BenchError(f"chunked body: bad chunk size {line[:40]!r}")
    return int(digits, 16)


class Identity:
    """A body as sent: up to ``Content-Length``, or (None) until the connection closes."""

    def __init__(self, length: int | None) -> None:
        self.left = length
        self.ended = length == 0

    def feed(self, data: bytes) -> bytes:
        if self.left is None:
            return data
        data = data[: self.left]
        self.left -= len(data)
        self.ended = not self.left
        return data


class Events:
    """SSE framing: ``feed`` the body's bytes, get each complete event's ``(kind, data)``;
    comments (heartbeats) and events without data are dropped, as EventSource drops them."""

    def __init__(self) -> None:
        self._rest = b""  # the unfinished event; a CR ending it is read with what follows

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        buf = self._rest + data if self._rest else data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        blocks = buf.split(b"\n\n")
        self._rest = blocks.pop()
        if len(self._rest) > MAX_EVENT:
            raise BenchError(f"an SSE event longer than {MAX_EVENT} bytes: no blank line")
        return [event for block in blocks if (event := parse_event(block)) is not None]


def parse_event(block: bytes) -> tuple[str, str] | None:
    """One event's lines: ``(event, data)`` (``message`` by default, data lines joined
    with LF); None for a comment only or an empty data, which are not dispatched."""
    if (usual := USUAL.fullmatch(block)) is not None:  # what our API sends: half the CPU
        kind, text = usual.groups()
        return (kind.decode(), text.decode()) if text else None
    kind = b"message"
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if not line or line[0] == 0x3A:  # ":" a comment (heartbeat)
            continue
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            kind = value
    text = b"\n".join(data)
    if not text:
        return None
    return kind.decode(), text.decode()


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """A response's status code and headers (names lowercased)."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not (code.isdigit() and len(code) == 3):
        raise BenchError(f"not an HTTP/1.x response: {status_line[:80]!r}")
    headers = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise BenchError(f"a malformed response header: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return int(code), headers


def body_for(headers: dict[str, str]) -> Chunked | Identity:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return Chunked()
    length = headers.get("content-length")
    if length is None:
        return Identity(None)
    if not length.isdigit():
        raise BenchError(f"a malformed Content-Length: {length[:40]!r}")
    return Identity(int(length))


class Stream(asyncio.Protocol):
    """One GET's response, parsed as it arrives: head, then body, then events. The
    outcome goes to ``done``: None when the server ended the stream, else the error."""

    def __init__(self, what: str, on_event: OnEvent, opened: Callable[[], None] | None) -> None:
        self.what = what  # "GET <url>", for errors
        self.on_event = on_event
        self.opened = opened
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.reads = 0  # data_received calls: the idle check compares them
        self.status = 0  # 0 until the head is in
        self.transport: asyncio.Transport | None = None
        self._head = b""
        self._body: Chunked | Identity = Identity(None)
        self._events = Events()
        self._refused = b""  # a non-200 answer's body, for its error

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reads += 1
        if self.done.done():
            return
        try:
            if not self.status:
                data = self._read_head(data)
            if self.status:
                self._read_body(data)
        except Exception as exc:  # a parse error, or on_event's: the caller's to see
            self._finish(exc)

    def eof_received(self) -> bool | None:
        return None  # close: connection_lost says how the stream ended

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if self.status == 200 and isinstance(self._body, Identity) and self._body.left is None:
            self._finish(None)  # a close-delimited body ends this way
        elif self.status not in (0, 200):
            self._finish(self._refusal())
        else:
            where = "the response head" if not self.status else "the stream's end"
            self._finish(BenchError(f"{self.what}: connection closed before {where} ({exc})"))

    def _read_head(self, data: bytes) -> bytes:
        self._head += data
        head, sep, rest = self._head.partition(b"\r\n\r\n")
        if not sep:
            if len(self._head) > MAX_HEAD:
                raise BenchError(f"{self.what}: no end of the response head in {MAX_HEAD} B")
            return b""
        status, headers = parse_head(head)
        self._body = body_for(headers)
        self.status = status
        if status == 200 and self.opened is not None:
            self.opened()
        return rest

    def _read_body(self, data: bytes) -> None:
        body = self._body.feed(data) if data else b""
        if self.status != 200:
            self._refused = (self._refused + body)[:300]
            if self._body.ended:
                self._finish(self._refusal())
            return
        for kind, text in self._events.feed(body) if body else ():
            self.on_event(kind, text)
        if self._body.ended:
            self._finish(None)

    def _refusal(self) -> BenchError:
        text = self._refused.decode(errors="replace")
        return BenchError(f"{self.what} answered {self.status}: {text}")

    def _finish(self, exc: BaseException | None) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


def request(url: str, headers: Mapping[str, str]) -> tuple[str, int, bool, bytes]:
    """(host, port, TLS?, the GET's bytes) for ``url``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BenchError(f"not an http(s) URL: {url!r}")
    tls = parts.scheme == "https"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Accept: text/event-stream",
        "Cache-Control: no-cache",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    wire = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return parts.hostname, parts.port or (443 if tls else 80), tls, wire


async def read_events(
    url: str,
    on_event: OnEvent,
    opened: Callable[[], None] | None = None,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Read ``url``'s events until the server ends the stream, handing each on as
    ``on_event(kind, data text)``; ``opened`` once it answered 200. A non-200 answer,
    a malformed or cut stream, or ``IDLE_S`` without a byte: BenchError."""
    host, port, tls, wire = request(url, headers or {})
    loop = asyncio.get_running_loop()
    what = f"GET {url}"
    try:
        async with asyncio.timeout(CONNECT_S):
            transport, stream = await loop.create_connection(
                lambda: Stream(what, on_event, opened), host, port, ssl=tls or None
            )
    except (OSError, TimeoutError) as exc:
        raise BenchError(f"{what}: could not connect: {exc!r}") from exc
    try:
        transport.write(wire)
        await _until_done(stream, what)
    finally:
        stream.done.cancel()  # a no-op once done; else nobody is left to read it
        transport.close()


async def _until_done(stream: Stream, what: str) -> None:
    while not stream.done.done():
        seen = stream.reads
        await asyncio.wait([stream.done], timeout=IDLE_S)
        if not stream.done.done() and stream.reads == seen:
            raise BenchError(f"{what}: nothing received for {IDLE_S:g} s")
    stream.done.result()
