"""How one streamed answer is read: the event stream's ``data`` lines, each chunk's JSON
read for what pushsvc uses (text, finish reason, model, usage), and how the stream ended.

The official ``openai`` client makes the request (its auth, headers and HTTP errors);
the body is read here, from the client's raw response (``with_streaming_response``).
The client's own reading builds a ``ChatCompletionChunk`` model of every chunk with its
lax ``construct`` path: 108 µs a chunk against 4 µs for ``json.loads`` and the few
fields read here, a third of a streaming worker's CPU (BENCHMARKS.md, issue 16). What
the client's reading does besides is kept: an ``{"error": ...}`` chunk raises
``openai.APIError`` with that body, a read that times out or fails raises
``APITimeoutError``/``APIConnectionError``, and the rest of the body after ``[DONE]`` is
read, so the connection can be used again.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2
import openai

from .errors import JobError
from .telemetry import Telemetry
from .telemetry import estimate_tokens as estimate_chars

# finish_reason values that mean the answer was cut, not finished.
CUT_REASONS = frozenset({"length", "content_filter"})


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    estimated: bool = False  # the server sent no usage: counted from characters


def estimate_tokens(text: str) -> int:
    """Tokens in ``text`` when the server does not say: about 4 characters a token for
    English with the common BPE vocabularies (no tokenizer that works offline for every
    model)."""
    return estimate_chars(len(text))


@dataclass
class Completion:
    """What a finished stream gave: text, model, usage (may be estimated), finish reason."""

    text: str = ""
    model: str = ""
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None
    telemetry: Telemetry = field(default_factory=dict)  # models.LLMTelemetry's fields

    @property
    def truncated(self) -> bool:
        """The answer was cut (``length``, ``content_filter``), not finished."""
        return self.finish_reason in CUT_REASONS


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event of ``lines`` (several data lines joined by
    newlines; comments and other fields skipped), the last one even when the body ends
    without its blank line."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


@dataclass
class Answer:
    """One stream's answer as it is read; malformed chunks raise ``JobError``."""

    prompt: str = ""  # what a usage estimate counts
    done: Completion = field(default_factory=Completion)
    parts: list[str] = field(default_factory=list)
    chunks: int = 0
    saw_done: bool = False  # a ``data: [DONE]`` line came

    async def read(
        self, response: httpx2.Response, on_delta: Callable[[str], Awaitable[None]]
    ) -> None:
        """Read the body to its end, calling ``await on_delta(text)`` per chunk with text."""
        events = sse_data(response.aiter_lines())
        while (data := await self._next(events, response)) is not None:
            if self.saw_done:
                continue  # the rest of the body, read so the connection can be reused
            if data.startswith("[DONE]"):
                self.saw_done = True
            elif text := self._take(data, response.request):
                await on_delta(text)

    async def _next(self, events: AsyncIterator[str], response: httpx2.Response) -> str | None:
        try:
            return await anext(events, None)
        except httpx2.TimeoutException as exc:
            if self.saw_done:  # a server that keeps the body open after [DONE]
                return None
            raise openai.APITimeoutError(request=response.request) from exc
        except httpx2.RequestError as exc:
            if self.saw_done:
                return None
            raise openai.APIConnectionError(request=response.request) from exc

    def _take(self, data: str, request: httpx2.Request) -> str:
        try:
            return self.add(json.loads(data), request)
        except (ValueError, TypeError, AttributeError) as exc:
            raise JobError(
                f"the model sent a malformed chunk after {self.chunks} chunks: "
                f"{type(exc).__name__}: {exc}"[:500],
                code="upstream_malformed",
                retryable=True,
            ) from exc

    def add(self, chunk: Any, request: httpx2.Request) -> str:
        """Take in one chunk; returns its text (often empty). Servers leave out what they
        consider empty (a finish chunk without ``delta``, a usage chunk without choices)."""
        if not isinstance(chunk, dict):
            raise TypeError(f"a chunk is {type(chunk).__name__}, not an object")
        if error := chunk.get("error"):
            raise _stream_error(error, request)
        self.chunks += 1
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise TypeError(f"a chunk's choices is {type(choices).__name__}, not a list")
        self.done.model = chunk.get("model") or self.done.model
        if isinstance(usage := chunk.get("usage"), dict):
            self.done.usage = Usage(
                int(usage.get("prompt_tokens") or 0),
                int(usage.get("completion_tokens") or 0),
                int(usage.get("total_tokens") or 0),
            )
        text = ""
        for choice in choices:  # none in the final usage chunk
            self.done.finish_reason = choice.get("finish_reason") or self.done.finish_reason
            delta = choice.get("delta")
            if isinstance(delta, dict) and (content := delta.get("content")):
                if not isinstance(content, str):
                    raise TypeError(f"a delta's content is {type(content).__name__}, not text")
                text += content
        self.parts.append(text)
        return text

    def finish(self) -> Completion:
        """The completion, or ``upstream_truncated`` when the stream just stopped."""
        if self.done.finish_reason is None and not self.saw_done:
            raise JobError(
                f"the model's stream ended after {self.chunks} chunks without a "
                "finish_reason or [DONE]: the answer was cut short",
                code="upstream_truncated",
                retryable=True,
            )
        self.done.text = "".join(self.parts)
        if not self.done.usage.completion_tokens:  # servers that send no usage chunk
            made, asked = estimate_tokens(self.done.text), estimate_tokens(self.prompt)
            self.done.usage = Usage(asked, made, asked + made, estimated=True)
        return self.done


def _stream_error(error: Any, request: httpx2.Request) -> openai.APIError:
    """An error sent inside a 200 stream, as the client's own reading raises it."""
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str) or not message:
        message = "An error occurred during streaming"
    return openai.APIError(message, request, body=error)
