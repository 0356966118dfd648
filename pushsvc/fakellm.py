"""The offline model: an OpenAI-compatible chat server with deterministic text and faults.

Serves ``pushsvc dev`` (no network, no API key) and the tests; directives are listed below.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

logger = logging.getLogger(__name__)

MODEL_ID = "fake-1"
DEFAULT_TOKENS = 40
JSON_PIECE_CHARS = 8
DROP_AFTER_CHUNKS = 3  # content chunks a ``drop`` stream sends before cutting the connection
STALL_S = 3600.0
MAX_DIRECTIVE = 100_000  # tokens and rate: keeps a typo from building a huge answer
FAULT_HEADER = "x-fake-fault"

# Directives, anywhere in the last user message (the header X-Fake-Fault: SPEC wins):
#   [[tokens:N]]  answer N words (default 40, capped by max_tokens)
#   [[rate:N]]    write N tokens a second (0: unpaced)
#   [[fault:SPEC]] where SPEC is NAME[:after=S][:times=K], NAME one of FAULTS; ``after`` is
#   the 429's Retry-After, ``times`` fails only the first K requests with that SPEC + message.
_DIRECTIVE = re.compile(r"\[\[(tokens|rate|fault):([^\]]*)\]\]")
_KEYS_LINE = re.compile(r"^[ \t]*JSON keys:[ \t]*(.*)$", re.MULTILINE)
STATUS_FAULTS = frozenset({"400", "401", "429", "500", "503"})
FAULTS = STATUS_FAULTS | {"stall", "drop", "malformed"}

# (type, code, message) of each error status, as OpenAI words them.
_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request (fake-llm fault)."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    429: ("rate_limit_error", "rate_limit_exceeded", "Rate limit reached (fake-llm fault)."),
    500: ("server_error", None, "The server had an error while processing your request."),
    503: ("server_error", "service_unavailable", "The server is overloaded (fake-llm fault)."),
}

VOCAB = (
    "the quick model writes plain words for tests while jobs wait and browsers listen "
    "to every token that arrives over a stream of events from one small server on the "
    "local machine with no key no network and no cost so each answer stays the same "
    "until someone changes what they ask or how many tokens they want today"
).split()


class BadRequest(Exception):
    """A request this server cannot answer; becomes a 400 in OpenAI's error shape."""


@dataclass(frozen=True)
class Fault:
    spec: str
    name: str
    after_s: float = 1.0
    times: int | None = None


@dataclass(frozen=True)
class Ask:
    """One chat request, read: its body's options and the directives of its last user turn."""

    model: str
    message: str  # the last user message as sent
    prompt: str  # the same without directives: the seed of the answer
    prompt_tokens: int
    stream: bool
    include_usage: bool
    max_tokens: int | None
    tokens: int
    rate: float
    json_keys: tuple[str, ...] | None
    fault: Fault | None


@dataclass
class Stats:
    requests: int = 0
    open_streams: int = 0
    completed_streams: int = 0
    disconnects: int = 0  # responses whose client left before the server finished


def parse_fault(spec: str) -> Fault:
    name, *options = spec.strip().split(":")
    if name not in FAULTS:
        raise BadRequest(f"unknown fault {name!r}; known: {', '.join(sorted(FAULTS))}")
    values: dict[str, Any] = {}
    for option in options:
        key, _, value = option.partition("=")
        try:
            number = {"after": float, "times": int}[key](value)
        except (KeyError, ValueError):
            number = -1
        if not 0 <= number < math.inf:
            raise BadRequest(f"bad fault option {option!r} in {spec!r}")
        values["after_s" if key == "after" else "times"] = number
    return Fault(spec=spec.strip(), name=name, **values)


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _number(name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise BadRequest(f"bad directive [[{name}:{value}]]") from None
    if not 0 <= number <= MAX_DIRECTIVE or not math.isfinite(number):
        raise BadRequest(f"bad directive [[{name}:{value}]] (0 to {MAX_DIRECTIVE})")
    return number


def _max_tokens(body: dict[str, Any]) -> int | None:
    limits = [body.get("max_tokens"), body.get("max_completion_tokens")]
    ints = [v for v in limits if v is not None]
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in ints):
        raise BadRequest("max_tokens must be a non-negative integer")
    return min(ints) if ints else None


def _json_keys(body: dict[str, Any], message: str) -> tuple[str, ...] | None:
    line = _KEYS_LINE.search(message)
    if line is not None:
        keys = tuple(k.strip() for k in line.group(1).split(",") if k.strip())
        return keys or ("name", "description")
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_object":
        return ("name", "description")
    return None


def read_ask(body: object, fault_header: str | None, default_rate: float) -> Ask:
    """Read a chat request's body and directives; raise BadRequest for what OpenAI refuses."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("you must provide a model parameter")
    turns = [m for m in messages if isinstance(m, dict)]
    users = [_text(m.get("content")) for m in turns if m.get("role") == "user"]
    message = users[-1] if users else ""
    directives = dict(_DIRECTIVE.findall(message))
    fault_spec = fault_header or directives.get("fault")
    stream_options = body.get("stream_options") or {}
    return Ask(
        model=body["model"],
        message=message,
        prompt=_DIRECTIVE.sub("", message).strip(),
        prompt_tokens=max(1, sum(len(_text(m.get("content")).split()) for m in turns)),
        stream=bool(body.get("stream")),
        include_usage=bool(
            isinstance(stream_options, dict) and stream_options.get("include_usage")
        ),
        max_tokens=_max_tokens(body),
        tokens=int(_number("tokens", directives.get("tokens", str(DEFAULT_TOKENS)))),
        rate=_number("rate", directives["rate"]) if "rate" in directives else default_rate,
        json_keys=_json_keys(body, message),
        fault=parse_fault(fault_spec) if fault_spec else None,
    )


def words(seed: str, count: int) -> list[str]:
    """``count`` words from VOCAB, the same for the same seed on any machine and Python."""
    root = hashlib.sha256(seed.encode()).digest()
    picks = (hashlib.sha256(root + i.to_bytes(4, "big")).digest() for i in range(count))
    return [VOCAB[int.from_bytes(p[:4], "big") % len(VOCAB)] for p in picks]


def answer(ask: Ask, malformed: bool) -> tuple[list[str], str]:
    """The answer as token pieces, and its finish reason (``length`` when max_tokens cut it)."""
    if ask.json_keys is None and not malformed:
        pieces = [w if i == 0 else f" {w}" for i, w in enumerate(words(ask.prompt, ask.tokens))]
    else:
        keys = ask.json_keys or ("name", "description")
        obj = {k: " ".join(words(f"{ask.prompt}\0{k}", 3)) for k in keys}
        text = json.dumps(obj)
        if malformed:  # a proper prefix of a JSON object never parses
            text = text[: max(1, len(text) * 2 // 3)]
        pieces = [text[i : i + JSON_PIECE_CHARS] for i in range(0, len(text), JSON_PIECE_CHARS)]
    if ask.max_tokens is not None and len(pieces) > ask.max_tokens:
        return pieces[: ask.max_tokens], "length"
    return pieces, "stop"


def error_response(status: int, message: str | None = None, retry_after: float = 0) -> Response:
    type_, code, default = _ERRORS[status]
    body = {"error": {"message": message or default, "type": type_, "param": None, "code": code}}
    headers = {"Retry-After": f"{retry_after:g}"} if status == 429 else None
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


async def stream_frames(ask: Ask, pieces: list[str], finish: str) -> AsyncIterator[bytes]:
    """The SSE body: role chunk, paced content (an empty delta mid-way), usage, [DONE]."""
    fault = ask.fault.name if ask.fault else None
    writer = ChunkWriter(ask)
    yield writer.delta({"role": "assistant", "content": ""})
    interval = _interval(ask.rate)
    for i, piece in enumerate(pieces):
        if fault == "drop" and i == DROP_AFTER_CHUNKS:
            return  # the response never completes: see EventStream
        await anyio.sleep(interval)
        if i == len(pieces) // 2 and i > 0:
            yield writer.delta({})  # real servers send these, clients must skip them
        last = i == len(pieces) - 1
        yield writer.delta({"content": piece}, finish if last else None)
        if fault == "stall" and i == 0:
            await anyio.sleep(STALL_S)
    if not pieces:
        yield writer.delta({}, finish)
    if fault == "drop":
        return
    if ask.include_usage:
        yield writer.frame({"choices": [], "usage": _usage(ask, len(pieces))})
    yield b"data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """An SSE response that stops the moment its client leaves, even mid-sleep, and counts.

    ``complete=False`` ends it without the final body message: the server then closes the
    connection, which the client sees as a connection error (the ``drop`` fault).
    """

    def __init__(self, frames: AsyncIterator[bytes], stats: Stats, complete: bool) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(frames, media_type="text/event-stream", headers=headers)
        self.stats, self.complete = stats, complete

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.stats.open_streams += 1
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


class FakeLLM:
    """The server's state (stats, fault counters) and its endpoints."""

    def __init__(self, tokens_per_s: float, api_key: str | None) -> None:
        self.tokens_per_s, self.api_key = tokens_per_s, api_key
        self.stats = Stats()
        self.fault_hits: dict[str, int] = {}  # times=K: requests seen per (spec, message) hash

    def _denied(self, request: Request) -> Response | None:
        if self.api_key is None:
            return None
        sent = request.headers.get("authorization", "")
        if secrets.compare_digest(sent.encode(), f"Bearer {self.api_key}".encode()):
            return None
        return error_response(401)

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

    async def chat(self, request: Request) -> Response:
        self.stats.requests += 1
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            body = json.loads(await request.body())
            ask = read_ask(body, request.headers.get(FAULT_HEADER), self.tokens_per_s)
        except (BadRequest, ValueError) as exc:
            return error_response(400, f"{exc}")
        fault = self._active(ask)
        if fault is not None:
            logger.info("fake-llm: injecting fault %s", fault.spec)
            if fault.name in STATUS_FAULTS:
                return error_response(int(fault.name), retry_after=fault.after_s)
        ask = replace(ask, fault=fault)
        pieces, finish = answer(ask, malformed=fault is not None and fault.name == "malformed")
        if ask.stream:
            drop = fault is not None and fault.name == "drop"
            return EventStream(stream_frames(ask, pieces, finish), self.stats, not drop)
        return await self._whole(request, ask, pieces, finish)

    async def _whole(self, request: Request, ask: Ask, pieces: list[str], finish: str) -> Response:
        fault = ask.fault.name if ask.fault else None
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
            "usage": _usage(ask, len(pieces)),
            "system_fingerprint": "fp_fake",
        }
        return CutResponse(body) if fault == "drop" else JSONResponse(body)


def create_fake_llm_app(tokens_per_s: float = 50.0, api_key: str | None = None) -> Starlette:
    """The offline model as an ASGI app; ``api_key`` makes it require ``Bearer <key>``."""
    fake = FakeLLM(tokens_per_s, api_key)
    app = Starlette(
        routes=[
            Route("/v1/models", fake.models, methods=["GET"]),
            Route("/v1/chat/completions", fake.chat, methods=["POST"]),
            Route("/_fake/stats", fake.stats_view, methods=["GET"]),
        ]
    )
    app.state.fake = fake
    return app


def run_fake_llm(host: str, port: int, tokens_per_s: float) -> None:
    """Serve the offline model until interrupted (blocking)."""
    import uvicorn

    # A stalled stream whose client never leaves would otherwise hold shutdown for an hour.
    uvicorn.run(
        create_fake_llm_app(tokens_per_s),
        log_config=None,  # logging is configured by the CLI (structured, redacted)
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=2,
    )
