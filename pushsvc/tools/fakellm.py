"""The offline model: an OpenAI-compatible chat server with deterministic text and faults.

Serves ``pushsvc dev`` (no network, no API key) and the tests; fakeask.py lists its directives.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .fakeask import (
    CUT_FAULTS,
    DEFAULT_TOKENS,
    STATUS_FAULTS,
    STREAM_ERROR_FAULTS,
    Ask,
    Fault,
    InvalidAsk,
    answer,
    read_ask,
    stamped,
)

logger = logging.getLogger(__name__)

MODEL_ID = "fake-1"
STALL_S = 3600.0
FAULT_HEADER = "x-fake-fault"

# (type, code, message) of each error status, as OpenAI words them.
_OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request (fake-llm fault)."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    429: ("rate_limit_error", "rate_limit_exceeded", "Rate limit reached (fake-llm fault)."),
    500: ("server_error", None, "The server had an error while processing your request."),
    503: ("server_error", "service_unavailable", "The server is overloaded (fake-llm fault)."),
}


@dataclass
class Counters:
    """What the fake model has served (its ``/stats`` answer)."""

    requests: int = 0
    open_streams: int = 0
    completed_streams: int = 0
    disconnects: int = 0  # responses whose client left before the server finished


@dataclass
class LimitCounters:
    """What the server's own limit (``--rpm``) did, and how busy it got (``/_fake/limits``)."""

    rate_limited: int = 0  # 429s of the limit
    peak_streams: int = 0  # the most streams open at once
    first_at: float = 0.0  # when the first and the last request were admitted (epoch s)
    last_at: float = 0.0


def openai_error_body(
    status: int, message: str | None = None, retry_after: float = 0
) -> dict[str, Any]:
    """OpenAI's error body for ``status``; a 429 says when to try again, as OpenAI's do."""
    type_, code, default = _OPENAI_ERRORS[status]
    if message is None and status == 429:
        default = f"{default} Please try again in {retry_after:g}s."
    return {"error": {"message": message or default, "type": type_, "param": None, "code": code}}


def openai_error_response(
    status: int, message: str | None = None, retry_after: float = 0
) -> Response:
    headers = {"Retry-After": f"{retry_after:g}"} if status == 429 else None
    body = openai_error_body(status, message, retry_after)
    return JSONResponse(body, status_code=status, headers=headers)


def _usage(ask: Ask, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": ask.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": ask.prompt_tokens + completion_tokens,
    }


def _interval(rate: float) -> float:
    return 1.0 / rate if rate > 0 else 0.0


async def sleep_unless_gone(receive: Receive, seconds: float) -> bool:
    """Sleep, but stop early when the client disconnects; True if it did."""
    with anyio.move_on_after(seconds):
        while (await receive())["type"] != "http.disconnect":
            pass
        return True
    return False


class ChunkWriter:
    """Builds the ``data: {chat.completion.chunk}`` frames of one streamed answer."""

    def __init__(self, ask: Ask) -> None:
        self.ask = ask
        self.base = {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": ask.model,
            "system_fingerprint": "fp_fake",
        }

    def frame(self, payload: dict[str, Any]) -> bytes:
        chunk = json.dumps({**self.base, **payload}, separators=(",", ":"))
        return f"data: {chunk}\n\n".encode()

    def delta(self, delta: dict[str, str], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        # With include_usage, real servers send "usage": null on every chunk but the last.
        extra = {"usage": None} if self.ask.include_usage else {}
        return self.frame({"choices": [choice], **extra})


async def stream_frames(ask: Ask, pieces: list[str], finish: str | None) -> AsyncIterator[bytes]:
    """The SSE body: role chunk, paced content (an empty delta mid-way), usage, [DONE];
    a cutting fault (CUT_FAULTS) ends it after ``at`` content chunks instead."""
    writer = ChunkWriter(ask)
    yield writer.delta({"role": "assistant", "content": ""})
    cut = ask.fault if ask.fault is not None and ask.fault.name in CUT_FAULTS else None
    sent = pieces if cut is None else pieces[: cut.at]
    async for frame in _content(ask, writer, sent, None if cut else finish):
        yield frame
    if cut is not None:
        if (last := _cut_frame(cut, writer)) is not None:
            yield last
        return  # drop: the response never completes (see CompletionStream)
    if not pieces:
        yield writer.delta({}, finish)
    if ask.include_usage:
        yield writer.frame({"choices": [], "usage": _usage(ask, len(pieces))})
    yield b"data: [DONE]\n\n"


async def _content(
    ask: Ask, writer: ChunkWriter, pieces: list[str], finish: str | None
) -> AsyncIterator[bytes]:
    """The content chunks, paced; ``finish`` on the last one."""
    interval = _interval(ask.rate)
    for i, piece in enumerate(pieces):
        await anyio.sleep(interval)
        if i == len(pieces) // 2 and i > 0:
            yield writer.delta({})  # real servers send these, clients must skip them
        last = i == len(pieces) - 1
        text = stamped(piece, time.time()) if ask.stamp else piece
        yield writer.delta({"content": text}, finish if last else None)
        if ask.fault is not None and ask.fault.name == "stall" and i == 0:
            await anyio.sleep(STALL_S)


def _cut_frame(fault: Fault, writer: ChunkWriter) -> bytes | None:
    """What a cutting fault sends before the stream ends (drop and truncate: nothing)."""
    if fault.name == "bad_chunk":  # half a chunk: the data line is not JSON
        whole = writer.delta({"content": " lost"}).rstrip()
        return whole[: len(whole) // 2] + b"\n\n"
    if fault.name in STREAM_ERROR_FAULTS:
        body = openai_error_body(int(fault.name.removeprefix("stream_")), retry_after=fault.after_s)
        return f"data: {json.dumps(body)}\n\n".encode()
    return None


class CompletionStream(StreamingResponse):
    """An SSE response that stops the moment its client leaves, even mid-sleep, and counts.

    ``complete=False`` ends it without the final body message: the server then closes the
    connection, which the client sees as a connection error (the ``drop`` fault).
    """

    def __init__(
        self,
        frames: AsyncIterator[bytes],
        stats: Counters,
        complete: bool,
        peaks: LimitCounters | None = None,
    ) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(frames, media_type="text/event-stream", headers=headers)
        self.stats, self.complete, self.peaks = stats, complete, peaks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.stats.open_streams += 1
        if self.peaks is not None:
            self.peaks.peak_streams = max(self.peaks.peak_streams, self.stats.open_streams)
        finished = False
        try:
            # Own the disconnect watch: ASGI 2.4 servers only report it on a failed send,
            # and a stalled stream sends nothing.
            async with anyio.create_task_group() as group:
                group.start_soon(self._watch, receive, group.cancel_scope)
                await send(
                    {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                )
                async for frame in self.body_iterator:
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
                if self.complete:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                finished = True
                group.cancel_scope.cancel()
        except* OSError:
            pass  # ASGI 2.4 servers raise this when the client left while we were writing
        finally:
            self.stats.open_streams -= 1
            if not finished:
                self.stats.disconnects += 1
            elif self.complete:
                self.stats.completed_streams += 1

    @staticmethod
    async def _watch(receive: Receive, scope: anyio.CancelScope) -> None:
        await sleep_unless_gone(receive, math.inf)
        scope.cancel()


class CutResponse(JSONResponse):
    """Sends the headers and half the body, then stops: the server closes the connection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        half = self.body[: len(self.body) // 2]
        await send({"type": "http.response.body", "body": half, "more_body": True})


class RequestWindow:
    """The server's own limit (``--rpm``), as strict as a provider's can be: at most
    ``limit`` requests in any ``window_s`` (a sliding window); past it, 429 with the time
    until the oldest leaves the window as Retry-After."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit, self.window_s = limit, window_s
        self.times: deque[float] = deque()

    def admit(self, now: float) -> float:
        """0 when the request is admitted (and counted), else the seconds to wait."""
        while self.times and self.times[0] <= now - self.window_s:
            self.times.popleft()
        if len(self.times) >= self.limit:
            return self.times[0] + self.window_s - now
        self.times.append(now)
        return 0.0


class FakeLLM:
    """The server's state (stats, fault counters) and its endpoints."""

    def __init__(
        self,
        tokens_per_s: float,
        api_key: str | None,
        answer_tokens: int,
        window: RequestWindow | None = None,
    ) -> None:
        self.tokens_per_s, self.api_key = tokens_per_s, api_key
        self.answer_tokens = answer_tokens
        self.window = window
        self.limits = LimitCounters()
        self.stats = Counters()
        self.fault_hits: dict[str, int] = {}  # times=K: requests seen per (spec, message) hash

    def _denied(self, request: Request) -> Response | None:
        if self.api_key is None:
            return None
        sent = request.headers.get("authorization", "")
        if secrets.compare_digest(sent.encode(), f"Bearer {self.api_key}".encode()):
            return None
        return openai_error_response(401)

    def _active(self, ask: Ask) -> Fault | None:
        """The request's fault, unless its ``times=K`` budget is spent."""
        fault = ask.fault
        if fault is None or fault.times is None:
            return fault
        key = hashlib.sha256(f"{fault.spec}\0{ask.message}".encode()).hexdigest()
        self.fault_hits[key] = seen = self.fault_hits.get(key, 0) + 1
        return fault if seen <= fault.times else None

    async def models(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        model = {"id": MODEL_ID, "object": "model", "created": 1767225600, "owned_by": "pushsvc"}
        return JSONResponse({"object": "list", "data": [model]})

    async def stats_view(self, request: Request) -> Response:
        return JSONResponse(asdict(self.stats))

    async def limits_view(self, request: Request) -> Response:
        return JSONResponse(asdict(self.limits))

    async def chat(self, request: Request) -> Response:
        self.stats.requests += 1
        if (denied := self._denied(request)) is not None:
            return denied
        if self.window is not None and (wait := self.window.admit(time.monotonic())) > 0:
            self.limits.rate_limited += 1
            return openai_error_response(429, retry_after=math.ceil(wait * 1000) / 1000)
        self.limits.first_at = self.limits.first_at or time.time()
        self.limits.last_at = time.time()
        try:
            body = json.loads(await request.body())
            ask = read_ask(
                body, request.headers.get(FAULT_HEADER), self.tokens_per_s, self.answer_tokens
            )
        except (InvalidAsk, ValueError) as exc:
            return openai_error_response(400, f"{exc}")
        fault = self._active(ask)
        if fault is not None:
            logger.info("fake-llm: injecting fault %s", fault.spec)
            status = fault.name.removeprefix("stream_")
            if fault.name in STATUS_FAULTS or (not ask.stream and status in STATUS_FAULTS):
                return openai_error_response(int(status), retry_after=fault.after_s)
        ask = replace(ask, fault=fault)
        pieces, finish = answer(ask, malformed=fault is not None and fault.name == "malformed")
        if ask.stream:
            drop = fault is not None and fault.name == "drop"
            frames = stream_frames(ask, pieces, finish)
            return CompletionStream(frames, self.stats, not drop, self.limits)
        return await self._whole(request, ask, pieces, finish)

    async def _whole(
        self, request: Request, ask: Ask, pieces: list[str], finish: str | None
    ) -> Response:
        fault = ask.fault.name if ask.fault else None
        if ask.fault is not None and fault == "truncate":
            pieces, finish = pieces[: ask.fault.at], None
        wait = STALL_S if fault == "stall" else _interval(ask.rate) * len(pieces)
        if await sleep_unless_gone(request.receive, wait):
            self.stats.disconnects += 1
        message = {"role": "assistant", "content": "".join(pieces), "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        body = {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": ask.model,
            "choices": [choice],
            **({} if ask.no_usage else {"usage": _usage(ask, len(pieces))}),
            "system_fingerprint": "fp_fake",
        }
        if fault == "bad_chunk":
            text = json.dumps(body).encode()
            return Response(text[: len(text) // 2], media_type="application/json")
        return CutResponse(body) if fault == "drop" else JSONResponse(body)


def create_fake_llm_app(
    tokens_per_s: float = 50.0,
    api_key: str | None = None,
    answer_tokens: int = DEFAULT_TOKENS,
    window: RequestWindow | None = None,
) -> Starlette:
    """The offline model as an ASGI app; ``api_key`` makes it require ``Bearer <key>``;
    ``answer_tokens``: the length of an answer no ``[[tokens:N]]`` sets; ``window``: its
    own request limit (429 past it, counted in ``/_fake/limits``)."""
    fake = FakeLLM(tokens_per_s, api_key, answer_tokens, window)
    app = Starlette(
        routes=[
            Route("/v1/models", fake.models, methods=["GET"]),
            Route("/v1/chat/completions", fake.chat, methods=["POST"]),
            Route("/_fake/stats", fake.stats_view, methods=["GET"]),
            Route("/_fake/limits", fake.limits_view, methods=["GET"]),
        ]
    )
    app.state.fake = fake
    return app


def run_fake_llm(
    host: str,
    port: int,
    tokens_per_s: float,
    answer_tokens: int = DEFAULT_TOKENS,
    window: RequestWindow | None = None,
    reuse_port: bool = False,
) -> None:
    """Serve the offline model until interrupted (blocking). ``reuse_port``: bind with
    SO_REUSEPORT, so several processes share the port and the kernel spreads connections
    over them (a bench's model must not be its bottleneck)."""
    import uvicorn

    config = uvicorn.Config(
        create_fake_llm_app(tokens_per_s, answer_tokens=answer_tokens, window=window),
        log_config=None,  # logging is configured by the CLI (structured, redacted)
        host=host,
        port=port,
        log_level="info",
        # A stalled stream whose client never leaves would otherwise hold shutdown for an hour.
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    if not reuse_port:
        server.run()
        return
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    with sock:
        server.run(sockets=[sock])
