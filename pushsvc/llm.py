"""The one place that talks to a model: ``openai.AsyncOpenAI`` streaming chat completions.

Works against any OpenAI-compatible server (OpenAI, vLLM, Ollama, LM Studio, the
offline fake). The server's errors are translated here into retryable or fatal
``JobError``s, so job code never sees an ``openai`` exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import openai

from .errors import JobError
from .settings import Settings

# (exception, error code, retryable): first match wins, so subclasses come first.
_ERRORS: list[tuple[type[Exception], str, bool]] = [
    (openai.APITimeoutError, "upstream_timeout", True),
    (openai.APIConnectionError, "upstream_unreachable", True),
    (openai.RateLimitError, "rate_limited", True),
    (openai.InternalServerError, "upstream_error", True),
    (openai.AuthenticationError, "upstream_auth_failed", False),
    (openai.PermissionDeniedError, "upstream_permission_denied", False),
    (openai.NotFoundError, "model_not_found", False),
    (openai.BadRequestError, "upstream_bad_request", False),
    (openai.UnprocessableEntityError, "upstream_bad_request", False),
    (openai.ConflictError, "upstream_error", True),
]


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: let the backoff decide


def _classify(exc: Exception) -> tuple[str, bool]:
    for kind, code, retryable in _ERRORS:
        if isinstance(exc, kind):
            return code, retryable
    # Other statuses: retry server errors, fail the rest.
    return "upstream_error", getattr(exc, "status_code", 0) >= 500


@contextlib.contextmanager
def map_openai_errors() -> Iterator[None]:
    """Turn the model server's errors into ``JobError``s with a clear ``code``."""
    try:
        yield
    except openai.OpenAIError as exc:
        code, retryable = _classify(exc)
        message = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
        raise JobError(
            message[:500], code=code, retryable=retryable, retry_after_s=_retry_after(exc)
        ) from exc


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass
class Completion:
    """What a finished stream gave: text, model and usage (usage may be estimated)."""

    text: str = ""
    model: str = ""
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None


class LLM:
    """A configured client; one per worker process, closed with the worker."""

    def __init__(self, settings: Settings) -> None:
        key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else "unset"
        self.default_model = settings.llm_model
        # Retries are pushsvc's (backoff per job type), so the client makes none.
        self.client = openai.AsyncOpenAI(
            api_key=key,
            base_url=settings.llm_base_url,
            max_retries=0,
            timeout=settings.llm_timeout_s,
        )

    async def aclose(self) -> None:
        await self.client.close()

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        json_mode: bool = False,
        on_delta: Any = None,
    ) -> Completion:
        """Stream a completion to its end, calling ``await on_delta(text)`` per delta."""
        done = Completion()
        async for delta in self._chunks(messages, done, model, max_tokens, temperature, json_mode):
            if on_delta is not None:
                await on_delta(delta)
        return done

    async def _chunks(
        self,
        messages: list[dict[str, str]],
        done: Completion,
        model: str | None,
        max_tokens: int | None,
        temperature: float | None,
        json_mode: bool,
    ) -> AsyncIterator[str]:
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
        parts: list[str] = []
        with map_openai_errors():
            stream = await self.client.chat.completions.create(**args)
            # ``async with``: a cancelled job closes the HTTP stream to the model at once.
            async with stream:
                async for chunk in stream:
                    done.model = chunk.model or done.model
                    if chunk.usage is not None:
                        done.usage = Usage(
                            chunk.usage.prompt_tokens,
                            chunk.usage.completion_tokens,
                            chunk.usage.total_tokens,
                        )
                    for choice in chunk.choices:  # none in the final usage chunk
                        done.finish_reason = choice.finish_reason or done.finish_reason
                        if choice.delta and choice.delta.content:
                            parts.append(choice.delta.content)
                            yield choice.delta.content
        done.text = "".join(parts)
        if not done.usage.completion_tokens:  # servers that send no usage chunk
            done.usage.completion_tokens = len(parts)
            done.usage.total_tokens = done.usage.prompt_tokens + len(parts)
