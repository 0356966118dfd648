"""The API's HTTP server: uvicorn, with bounds on what one client connection may hold.

uvicorn starts no timer until a connection has sent a whole request: a socket that sends
nothing, or headers a byte at a time, holds its descriptor for ever, and 19,990 of them
used up the process's open-file limit (``/healthz`` stopped answering). Its
``limit_concurrency`` answers 503 once too many connections are open, but those idle
sockets still count (and its 503 is plain text). uvicorn takes the HTTP protocol as a
class (``Config(http=...)``): :class:`LimitedProtocol` is its httptools protocol plus a
deadline and a size limit for each request's headers, room made for a new connection by
closing the one that has waited longest for its headers, and a JSON 503 while every
connection is busy. (A subclass of uvicorn's own class: uvicorn offers no hook for this;
the internals it relies on are pinned with uvicorn's range, ``<1``, and tested.)
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import resource
import socket
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import PushsvcError, Unavailable
from .responses import JSONResponse
from .settings import Settings

logger = logging.getLogger(__name__)

FD_RESERVE = 256  # descriptors kept for Redis connections, logs and files
BUSY_LOG_EVERY_S = 10.0  # "every connection is busy", at most this often


async def busy(scope: Scope, receive: Receive, send: Send) -> None:
    """The answer to a request that arrives while every connection is busy."""
    err = Unavailable(
        "the server has no room for another connection; try again", code="server_busy"
    )
    headers = {**(err.headers or {}), "Connection": "close"}
    await JSONResponse(err.to_dict(), err.status_code, headers)(scope, receive, send)


@dataclass
class Limits:
    """One server's connection limits, and the connections it may close to make room."""

    max_connections: int
    header_timeout_s: float
    max_header_bytes: int
    # Connections waiting for a request's headers (new, idle between requests, or slow),
    # the longest-waiting first: the ones to close when a new connection needs room.
    waiting: dict[LimitedProtocol, None] = field(default_factory=dict)
    busy_logged: float = 0.0  # monotonic time of the last "busy" warning

    def full(self, connections: int) -> bool:
        """Over the limit (every connection busy): say so now and then, and answer 503."""
        if connections <= self.max_connections:
            return False
        if time.monotonic() - self.busy_logged > BUSY_LOG_EVERY_S:
            self.busy_logged = time.monotonic()
            logger.warning("%d connections, all busy: answering 503", connections)
        return True


class LimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; a request's headers must come within
    ``header_timeout_s`` (else 408) and within ``max_header_bytes`` (else 431)."""

    limits: ClassVar[Limits]  # set on the subclass each server makes (protocol_for)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None  # armed while headers come
        self._head_bytes = 0  # received since the headers began (first request: exact)
        self._linger: asyncio.TimerHandle | None = None  # the rest of an answered body

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            oldest = next(iter(self.limits.waiting), None)
            if oldest is not None:
                oldest._close()
            # else every connection is busy: this one's request gets a 503
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        self._stop_linger()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._head_timer is not None and self._head_bytes > self.limits.max_header_bytes:
            self._refuse(431, "headers_too_large", "the request's headers are too large")

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._stop_linger()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._await_head()

    def on_headers_complete(self) -> None:
        self._head_done()
        # uvicorn takes the app to run from self.app here (limit_concurrency is unset).
        app = self.app
        if self.limits.full(len(self.connections)):
            self.app = busy
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
            # Answered before its body was all in (401, 413, 429): uvicorn reads the rest
            # and drops it, for as long as the client sends it. It may take as long as
            # headers may (closing at once could reset the answer away), then goes.
            self._linger = self.loop.call_later(self.limits.header_timeout_s, self._close)
            return
        if not self.transport.is_closing() and self.timeout_keep_alive_task is not None:
            self.limits.waiting[self] = None  # idle until the next request: may give way

    def _await_head(self) -> None:
        if self._head_timer is None and not self.transport.is_closing():
            self._head_bytes = 0
            self._head_timer = self.loop.call_later(
                self.limits.header_timeout_s, self._head_timeout
            )
            self.limits.waiting[self] = None  # kept in its place if already idle there

    def _stop_linger(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None

    def _head_done(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.limits.waiting.pop(self, None)

    def _head_timeout(self) -> None:
        self._head_timer = None
        self._refuse(408, "request_timeout", "the request's headers did not arrive in time")

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer a JSON error (unless a response is under way) and close."""
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            body = json.dumps(PushsvcError(message, code=code).to_dict()).encode() + b"\n"
            head = (
                f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n\r\n"
            )
            self.transport.write(head.encode() + body)
        self._close()

    def _close(self) -> None:
        self._head_done()
        # Not counted from now on, though connection_lost comes a loop turn later.
        self.connections.discard(self)
        self.transport.close()


def protocol_for(limits: Limits) -> type[LimitedProtocol]:
    """A protocol class of one server's own (uvicorn instantiates the class it is given)."""
    return type("LimitedProtocol", (LimitedProtocol,), {"limits": limits})


def open_file_limit() -> int:
    """The process's open-file limit, first raised to the hard limit where it is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard or hard == resource.RLIM_INFINITY:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def limits_for(settings: Settings) -> Limits:
    """``PUSHSVC_MAX_CONNECTIONS``, or the open-file limit less ``FD_RESERVE``."""
    limit = settings.max_connections or max(64, open_file_limit() - FD_RESERVE)
    return Limits(limit, settings.header_timeout_s, settings.max_header_bytes)


def config_for(app: Any, settings: Settings, limits: Limits) -> uvicorn.Config:
    """The API's uvicorn configuration."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        log_config=None,  # keep our structured, redacting handler
        access_log=False,  # ours (app.AccessLog) leaves out query strings, and so tokens
        http=protocol_for(limits),
        ws="none",  # no WebSocket routes: upgrade requests are plain HTTP requests
        timeout_keep_alive=settings.keep_alive_s,
    )


def serve(app: Any, settings: Settings) -> bool:
    """Run the API until it is told to stop; False if it never started."""
    limits = limits_for(settings)
    config = config_for(app, settings, limits)
    logger.info("at most %d client connections", limits.max_connections)
    # uvicorn.run(), with a socket of ours: accepted connections inherit its SO_SNDBUF.
    sock = config.bind_socket()
    if settings.send_buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.send_buffer_bytes)
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    return server.started
