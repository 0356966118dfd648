"""The one place that talks to a model: ``openai.AsyncOpenAI`` streaming chat completions.

Works against any OpenAI-compatible server (OpenAI, vLLM, Ollama, LM Studio, the
offline fake). Every way a call can end is classified here, once, into a
``Completion`` or a retryable or fatal ``JobError``: job code never sees an
``openai`` exception, and nothing from the wire becomes an ``internal_error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import openai

from .answers import Answer, Completion
from .backoff import Delays, EqualJitterBackoff
from .errors import JobError
from .model_limits import ModelLimiter, request_tokens
from .settings import Settings
from .telemetry import CallHooks, CallWatch, OnWait, Telemetry, price_of

logger = logging.getLogger(__name__)

# An HTTP status -> (error code, retryable). Errors sent inside a 200 stream are given
# the status their type/code stands for (``_stream_status``) and mapped the same way.
_BY_STATUS: dict[int, tuple[str, bool]] = {
    400: ("upstream_bad_request", False),
    401: ("upstream_auth_failed", False),
    403: ("upstream_permission_denied", False),
    404: ("model_not_found", False),
    408: ("upstream_timeout", True),
    409: ("upstream_error", True),
    422: ("upstream_bad_request", False),
    429: ("rate_limited", True),
}

# Words in an in-stream error's ``code`` or ``type`` (lowercased, letters only) and the
# status they stand for; first match wins. Servers word them differently: OpenAI
# ``rate_limit_exceeded``/``server_error``/``invalid_api_key``, vLLM and LiteLLM their
# exception names (``RateLimitError``) or the status itself, Anthropic-style gateways
# ``overloaded_error``.
_STREAM_WORDS: tuple[tuple[str, int], ...] = (
    ("ratelimit", 429),
    ("quota", 429),
    ("toomanyrequests", 429),
    ("apikey", 401),
    ("auth", 401),
    ("permission", 403),
    ("notfound", 404),
    ("overload", 503),
    ("unavailable", 503),
    ("timeout", 504),
    ("server", 500),
    ("internal", 500),
    ("invalidrequest", 400),
    ("badrequest", 400),
    ("unprocessable", 422),
)
_TRY_AGAIN = re.compile(r"try again in (\d+(?:\.\d+)?)\s*(ms|s)\b", re.IGNORECASE)


def _by_status(status: int) -> tuple[str, bool]:
    # Other statuses: retry server errors, fail the rest.
    return _BY_STATUS.get(status, ("upstream_error", status >= 500))


def _stream_status(body: object) -> int | None:
    """The HTTP status an error sent inside a stream stands for (None: unknown)."""
    if not isinstance(body, dict):
        return None
    for key in ("status", "status_code", "code"):
        value = body.get(key)
        if isinstance(value, int | str) and str(value).isdigit() and 400 <= int(value) < 600:
            return int(value)
    for key in ("code", "type"):  # code first: OpenAI's bad key is type invalid_request_error
        name = re.sub(r"[^a-z]", "", str(body.get(key) or "").lower())
        for word, status in _STREAM_WORDS:
            if word in name:
                return status
    return None


def _retry_after(exc: openai.OpenAIError) -> float | None:
    """The server's retry hint: Retry-After(-Ms) headers, or "try again in 1.5s" in the
    message (all an error inside a 200 stream can carry)."""
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    with contextlib.suppress(TypeError, ValueError):  # an HTTP date: let the backoff decide
        if (ms := headers.get("retry-after-ms")) is not None:
            return float(ms) / 1000
        if (seconds := headers.get("retry-after")) is not None:
            return float(seconds)
    hint = _TRY_AGAIN.search(str(getattr(exc, "message", "")))
    if hint is None:
        return None
    return float(hint[1]) / (1000 if hint[2].lower() == "ms" else 1)


def classify(exc: openai.OpenAIError) -> JobError:
    """The ``JobError`` an ``openai`` error stands for: code, retryable, retry hint."""
    message = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
    if isinstance(exc, openai.APITimeoutError):  # before its base, APIConnectionError
        code, retryable = "upstream_timeout", True
    elif isinstance(exc, openai.APIConnectionError):
        code, retryable = "upstream_unreachable", True
    elif isinstance(exc, openai.APIStatusError):
        code, retryable = _by_status(exc.status_code)
    elif isinstance(exc, openai.APIResponseValidationError):  # a body not shaped as it should
        code, retryable = "upstream_malformed", True
    elif isinstance(exc, openai.APIError):
        # An error event inside a 200 stream: the SDK raises APIError without a status.
        # The server accepted the request, so an error it cannot name is its own: retry.
        status = _stream_status(exc.body)
        code, retryable = _by_status(status) if status is not None else ("upstream_error", True)
        kind = "/".join(str(v) for v in (exc.type, exc.code) if v)
        message = f"error inside the model's stream ({kind or 'unnamed'}): {exc.message}"
    else:
        code, retryable = "upstream_error", False
    return JobError(message[:500], code=code, retryable=retryable, retry_after_s=_retry_after(exc))


@contextlib.contextmanager
def map_openai_errors() -> Iterator[None]:
    """Turn the model server's errors into ``JobError``s with a clear ``code``."""
    try:
        yield
    except openai.OpenAIError as exc:
        raise classify(exc) from exc


class LLM:
    """A configured client; one per worker process, closed with the worker."""

    def __init__(
        self, settings: Settings, observe: Callable[[Telemetry], None] | None = None
    ) -> None:
        key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else "unset"
        self.default_model = settings.llm_model
        self.retry_window_s = settings.llm_retry_window_s
        self.retry_windows = settings.llm_retry_windows  # per job type
        self.call_timeout_s = settings.llm_timeout_s
        self.prices = settings.llm_prices
        self.observe = observe  # every finished call's telemetry (the worker's metrics)
        self.limits = ModelLimiter(settings)  # PUSHSVC_MODEL_LIMITS, shared by every worker
        # Retries are pushsvc's (backoff per job type), so the client makes none.
        self.client = openai.AsyncOpenAI(
            api_key=key,
            base_url=settings.llm_base_url,
            max_retries=0,
            timeout=settings.llm_first_token_timeout_s,  # per read: the first token, a stall
        )

    async def aclose(self) -> None:
        await self.client.close()
        await self.limits.aclose()

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        json_mode: bool = False,
        on_delta: Callable[[str], Awaitable[None]] | None = None,
        job_type: str | None = None,
        on_wait: OnWait | None = None,
        on_telemetry: Callable[[Telemetry], Awaitable[None]] | None = None,
    ) -> Completion:
        """Stream a completion to its end, calling ``await on_delta(text)`` per delta.

        Raises ``JobError`` for every way the call can fail; see ARCHITECTURE.md,
        "Model calls". A retryable failure before the first delta (a server restarting,
        a 5xx, a 429) is tried again with backoff for ``llm_retry_window_s`` (or the
        ``llm_retry_windows`` entry of ``job_type``): nothing was shown yet, and a model
        server that boots in seconds is ridden out. While it waits after a 429,
        ``await on_wait("rate_limited", until)`` (epoch seconds), then ``on_wait(None,
        None)`` once text flows or the call ends. ``await on_telemetry(llm)`` gets the
        call's telemetry (telemetry.py) with each delta and at the end; the final one is
        also ``Completion.telemetry``.
        """
        args = self._args(messages, model, max_tokens, temperature, json_mode)
        window = self.retry_windows.get(job_type or "", self.retry_window_s)
        hooks = CallHooks(on_delta, on_wait, on_telemetry)
        price = price_of(self.prices, args["model"])
        watch = CallWatch(args["model"], price, len(_prompt(args)), hooks)
        try:
            done = await self._tries(args, window, watch)
        except JobError:
            await watch.over()
            raise
        usage = done.usage
        done.telemetry = await watch.finish(
            usage.prompt_tokens, usage.completion_tokens, usage.estimated
        )
        if self.observe is not None:
            self.observe(done.telemetry)
        return done

    async def _tries(self, args: dict[str, Any], window: float, watch: CallWatch) -> Completion:
        """The call, tried again after a retryable failure before its first token."""
        deadline = time.monotonic() + window
        pauses = Delays(EqualJitterBackoff(cap=8.0, base=0.5))  # half to all of 0.5, 1, 2 .. 8 s
        limit_waits: list[float] = []  # the window does not count waits for the model's limits
        while True:
            try:
                return await self._limited(args, watch, limit_waits)
            except JobError as exc:
                wait = pauses.next(exc.retry_after_s)
                late = time.monotonic() + wait > deadline + sum(limit_waits)
                if watch.started or not exc.retryable or late:
                    raise
                logger.warning("model call failed (%s), trying again in %.1f s", exc.code, wait)
                await watch.pause(exc.code, wait)

    async def _limited(
        self, args: dict[str, Any], watch: CallWatch, limit_waits: list[float]
    ) -> Completion:
        """One try, under the model's limits (model_limits.py): it waits for its turn
        (the job says ``waiting: model_limit``; ``limit_waits`` gets how long), then holds
        its place while it runs."""
        tokens = request_tokens(args)
        asked = time.monotonic()
        async with self.limits.hold(args["model"], tokens, watch.hooks.on_wait):
            limit_waits.append(time.monotonic() - asked)
            watch.start()
            done = await self._stream(args, watch.delta)
        await self.limits.used(args["model"], tokens, done.usage.total_tokens)
        return done

    def _args(
        self,
        messages: list[dict[str, str]],
        model: str | None,
        max_tokens: int | None,
        temperature: float | None,
        json_mode: bool,
    ) -> dict[str, Any]:
        args: dict[str, Any] = {
            "model": model or self.default_model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if max_tokens is not None:
            args["max_tokens"] = max_tokens
        if temperature is not None:
            args["temperature"] = temperature
        if json_mode:
            args["response_format"] = {"type": "json_object"}
        return args

    async def _stream(
        self, args: dict[str, Any], on_delta: Callable[[str], Awaitable[None]]
    ) -> Completion:
        answer = Answer(_prompt(args))
        create = self.client.chat.completions.with_streaming_response.create
        try:
            async with asyncio.timeout(self.call_timeout_s):
                with map_openai_errors():
                    # ``async with``: a cancelled job closes the HTTP stream to the model at
                    # once. The client makes the request; its body is read by answers.py.
                    async with create(**args) as response:
                        await answer.read(response.http_response, on_delta)
        except TimeoutError as exc:
            # Past the whole call's time: the same call would take as long again, unless
            # no token came at all (a server that is stuck, not slow).
            raise JobError(
                f"the model call took longer than {self.call_timeout_s:g} s "
                f"(PUSHSVC_LLM_TIMEOUT_S), after {answer.chunks} chunks",
                code="upstream_timeout",
                retryable=answer.chunks == 0,
            ) from exc
        return answer.finish()


def _prompt(args: dict[str, Any]) -> str:
    """The request's messages as one text (what a usage estimate counts)."""
    return "\n".join(str(m.get("content", "")) for m in args["messages"])
