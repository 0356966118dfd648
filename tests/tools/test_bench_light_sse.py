"""tools/bench/light_sse.py: the raw-socket SSE reader of the token-path benches, fed a
response at every split point, and against small asyncio servers that answer by hand."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from pushsvc.tools.bench import light_sse
from pushsvc.tools.bench.light_sse import Chunked, Events, Stream, parse_event, read_events
from pushsvc.tools.bench.stack import BenchError

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
# What our API sends (LF), and what other servers may (CRLF): a retry, heartbeats, ids,
# a default-kind event, multi-line data, an event with no data, a field with no space.
SSE = (
    b"retry: 1000\n\n"
    b": ping\n\n"
    b'id: 1.ab\nevent: snapshot\ndata: {"output":""}\n\n'
    b'id: 2.ab\nevent: output\ndata:{"delta":"a<t:1.000>"}\n\n'
    b"data: one\r\ndata: two\r\n\r\n"
    b"event: queue\n\n"
    b": ping\r\n\r\n"
    b"event: completed\ndata: {}\n\n"
)
EVENTS = [
    ("snapshot", '{"output":""}'),
    ("output", '{"delta":"a<t:1.000>"}'),
    ("message", "one\ntwo"),
    ("completed", "{}"),
]


def chunked(body: bytes, sizes: tuple[int, ...] = (7, 50, 1, 300)) -> bytes:
    """``body`` in chunks of ``sizes`` (cycled; one with an extension), then the last."""
    out, pos, i = b"", 0, 0
    while pos < len(body):
        piece = body[pos : pos + sizes[i % len(sizes)]]
        ext = b";x=y" if i == 1 else b""
        out += b"%x%s\r\n%s\r\n" % (len(piece), ext, piece)
        pos, i = pos + len(piece), i + 1
    return out + b"0\r\n\r\n"


WIRE = HEAD + chunked(SSE)


async def feed(pieces: list[bytes]) -> tuple[Stream, list[tuple[str, str]], list[int]]:
    """A Stream fed ``pieces`` (no socket): it, the events it passed on, and how many
    events had come when ``opened`` was called."""
    got: list[tuple[str, str]] = []
    opened: list[int] = []
    stream = Stream("GET /t", lambda k, t: got.append((k, t)), lambda: opened.append(len(got)))
    for piece in pieces:
        stream.data_received(piece)
    return stream, got, opened


async def test_every_split_point() -> None:
    for cut in range(len(WIRE) + 1):
        stream, got, opened = await feed([WIRE[:cut], WIRE[cut:]])
        assert got == EVENTS and opened == [0], cut
        assert stream.done.done() and stream.done.result() is None
    stream, got, opened = await feed([WIRE[i : i + 1] for i in range(len(WIRE))])
    assert got == EVENTS and opened == [0] and stream.done.result() is None


def test_chunked_in_every_piece_size() -> None:
    body = bytes(range(256)) * 3
    wire = chunked(body, (1, 16, 255, 17))
    for size in (1, 2, 3, 5, 64, len(wire)):
        decoder = Chunked()
        out = b"".join(decoder.feed(wire[i : i + size]) for i in range(0, len(wire), size))
        assert out == body and decoder.ended, size


@pytest.mark.parametrize(
    "wire",
    [b"zz\r\n", b"0x10\r\n", b"1_0\r\n", b"-1\r\n", b"3\r\nabcXY", b"9" * 2000],
)
def test_chunked_refuses_malformed(wire: bytes) -> None:
    with pytest.raises(BenchError, match="chunked body"):
        Chunked().feed(wire)


def test_event_lines() -> None:
    assert parse_event(b"data:x") == ("message", "x")
    assert parse_event(b"data:  two spaces") == ("message", " two spaces")
    assert parse_event(b"event: output\nid: 3.e\ndata: {}\nunknown: 1\ndata") == (
        "output",
        "{}\n",
    )
    assert parse_event(b": comment\nevent: ping") is None  # no data: not dispatched
    assert parse_event(b"event: x\ndata:") is None  # empty data: not dispatched either
    # The usual shape (our API's) takes a shortcut, which must come to the same.
    assert parse_event(b"id: 1.e\nevent: x:y\ndata:  {}") == ("x:y", " {}")
    assert parse_event(b"id: 1.e\nevent: x\ndata: ") is None
    assert parse_event(b"event: x\ndata: a\ndata: b") == ("x", "a\nb")
    assert parse_event(b"event: x\ndata: a\nevent: y") == ("y", "a")
    events = Events()
    assert events.feed(b"data: a\r") == [] and events.feed(b"\n\r\ndata: b\n") == [("message", "a")]
    assert events.feed(b"\n") == [("message", "b")]


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Start a server answering with a handler; the URL of its stream endpoint."""
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1/jobs/j1/events?x=1"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def answering(
    wire: bytes, cuts: tuple[int, ...] = (), hold: bool = True, requests: list[bytes] | None = None
) -> Handler:
    """A handler writing ``wire`` in pieces split at ``cuts``; ``hold``: then keep the
    connection open until the client closes it (an error must not wait for a close);
    ``requests``: where the requests it read go."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        if requests is not None:
            requests.append(request)
        for start, end in zip((0, *cuts), (*cuts, len(wire)), strict=True):
            writer.write(wire[start:end])
            await writer.drain()
        if hold:
            await reader.read()  # b"" once the client closed
        writer.close()

    return handler


async def collect(url: str, **headers: str) -> tuple[list[tuple[str, str]], int]:
    got: list[tuple[str, str]] = []
    opened: list[None] = []
    await read_events(url, lambda k, t: got.append((k, t)), lambda: opened.append(None), headers)
    return got, len(opened)


@pytest.mark.timeout(10)
async def test_reads_a_real_server(serve: Callable[[Handler], Awaitable[str]]) -> None:
    requests: list[bytes] = []
    # Cuts mid status line, mid header, mid chunk size, mid CRLF, mid event line.
    cuts = (5, 40, len(HEAD) + 1, len(HEAD) + 8, len(HEAD) + 30, len(WIRE) - 4)
    url = await serve(answering(WIRE, cuts, requests=requests))
    got, opened = await collect(url, Authorization="Bearer t0k")
    assert got == EVENTS and opened == 1
    [request] = requests
    lines = request.decode().split("\r\n")
    assert lines[0] == "GET /v1/jobs/j1/events?x=1 HTTP/1.1"
    assert "Accept: text/event-stream" in lines and "Authorization: Bearer t0k" in lines
    assert lines[1].startswith("Host: 127.0.0.1:")


@pytest.mark.timeout(10)
async def test_a_close_delimited_body(serve: Callable[[Handler], Awaitable[str]]) -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"
    url = await serve(answering(head + SSE, (len(head) + 3,), hold=False))
    assert await collect(url) == (EVENTS, 1)


@pytest.mark.timeout(10)
async def test_a_refusal_raises(serve: Callable[[Handler], Awaitable[str]]) -> None:
    body = b'{"error":{"code":"not_found"}}'
    wire = b"HTTP/1.1 404 Not Found\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    url = await serve(answering(wire, (len(wire) - 5,)))
    opened: list[None] = []
    with pytest.raises(BenchError, match=re.escape(f"answered 404: {body.decode()}")):
        await read_events(url, lambda k, t: None, lambda: opened.append(None))
    assert opened == []


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP/1.x response"),
        (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "malformed response header"),
        (HEAD + b"5\r\ndata: x\r\n", "no CRLF after a chunk"),
        (HEAD + b"five\r\n", "bad chunk size"),
    ],
)
async def test_a_malformed_stream_raises(
    serve: Callable[[Handler], Awaitable[str]], wire: bytes, error: str
) -> None:
    url = await serve(answering(wire))
    with pytest.raises(BenchError, match=error):
        await collect(url)


@pytest.mark.timeout(10)
async def test_a_cut_stream_raises(serve: Callable[[Handler], Awaitable[str]]) -> None:
    url = await serve(answering(HEAD + b"20\r\ndata: cut", hold=False))
    with pytest.raises(BenchError, match="connection closed before the stream's end"):
        await collect(url)


@pytest.mark.timeout(10)
async def test_silence_raises_and_pings_do_not(
    serve: Callable[[Handler], Awaitable[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(light_sse, "IDLE_S", 0.3)

    async def pings(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(HEAD)
        for _ in range(8):  # 0.8 s: longer than two idle windows
            writer.write(chunked(b": ping\n\n")[:-5])
            await asyncio.sleep(0.1)  # the pace of the pings is what is tested
        writer.write(b"0\r\n\r\n")
        writer.close()

    assert await collect(await serve(pings)) == ([], 1)
    url = await serve(answering(HEAD))
    with pytest.raises(BenchError, match="nothing received for 0.3 s"):
        await collect(url)


@pytest.mark.timeout(10)
async def test_a_cancelled_reader_closes_its_connection(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    closed = asyncio.Event()
    opened = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(HEAD + chunked(SSE)[:-5])  # every event, but not the end
        await reader.read()
        closed.set()
        writer.close()

    url = await serve(handler)
    task = asyncio.create_task(read_events(url, lambda k, t: None, opened.set))
    await opened.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await closed.wait()


@pytest.mark.timeout(10)
async def test_an_error_in_on_event_is_raised(serve: Callable[[Handler], Awaitable[str]]) -> None:
    def on_event(kind: str, text: str) -> None:
        raise KeyError(kind)

    url = await serve(answering(WIRE))
    with pytest.raises(KeyError, match="snapshot"):
        await read_events(url, on_event)
