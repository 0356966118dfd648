"""The API's connection limits (pushsvc/server.py): when a server is full, the limits
taken from the settings, and a real limited server refusing headers that come too slowly
or too large."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import uvicorn
from starlette.responses import PlainTextResponse
from starlette.types import Receive, Scope, Send

from pushsvc.server import (
    FD_RESERVE,
    Limits,
    config_for,
    limits_for,
    open_file_limit,
    protocol_for,
)
from pushsvc.settings import Settings

from .procs import free_port


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    await PlainTextResponse("hello")(scope, receive, send)


@pytest.mark.timeout(10)
def test_full_only_past_the_limit() -> None:
    limits = Limits(max_connections=2, header_timeout_s=1, max_header_bytes=1024)
    assert not limits.full(2) and limits.full(3)


@pytest.mark.timeout(10)
def test_limits_come_from_the_settings_or_the_open_file_limit() -> None:
    limits = limits_for(Settings(max_connections=7, header_timeout_s=3, max_header_bytes=2048))
    assert (limits.max_connections, limits.header_timeout_s, limits.max_header_bytes) == (
        7,
        3,
        2048,
    )
    assert limits_for(Settings()).max_connections == max(64, open_file_limit() - FD_RESERVE)


@pytest.mark.timeout(10)
def test_each_server_gets_a_protocol_class_of_its_own() -> None:
    a, b = Limits(1, 1, 1024), Limits(2, 1, 1024)
    assert protocol_for(a).limits is a and protocol_for(b).limits is b


async def exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await reader.read()  # the server closes the connection
    writer.close()
    return answer


@pytest.mark.timeout(20)
async def test_a_real_server_answers_408_and_431_as_json() -> None:
    port = free_port()
    limits = Limits(max_connections=16, header_timeout_s=0.3, max_header_bytes=1024)
    config = uvicorn.Config(hello, port=port, http=protocol_for(limits), log_config=None)
    # Bound before serving: connections wait in the backlog until the server accepts.
    sock = config.bind_socket()
    sock.listen()
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        ok = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b"hello")
        slow = await exchange(port, b"GET / HTTP/1.1\r\n")
        assert slow.startswith(b"HTTP/1.1 408") and b"request_timeout" in slow
        big = await exchange(port, b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 4096)
        assert big.startswith(b"HTTP/1.1 431") and b"headers_too_large" in big
    finally:
        server.should_exit = True
        await task


@pytest.mark.timeout(30)
async def test_an_idle_connection_outlives_the_clients_keep_alive() -> None:
    """A server closing an idle connection races the client's next request on it (sent
    as the close is on its way: the request fails, ReadError). Clients drop idle
    connections after a while (httpx: 5 s), so the API, configured as ``pushsvc api``
    configures it, must keep them longer: the connection is still open after that."""
    client_expiry = httpx.Limits().keepalive_expiry
    assert client_expiry is not None
    settings = Settings(port=free_port())
    config = config_for(hello, settings, limits_for(settings))
    sock = config.bind_socket()
    sock.listen()
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", settings.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"hello")
        assert head.startswith(b"HTTP/1.1 200"), head
        # Asserting that nothing happens: the only wait here that is on the clock.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(client_expiry + 1):
                closed = await reader.read()
                pytest.fail(f"the server closed an idle connection early: {closed!r}")
        writer.close()
    finally:
        server.should_exit = True
        await task
