"""What a job's model calls are doing, live: time to the first token, tokens a second,
tokens and cost (``models.LLMTelemetry``'s fields), per call (``CallMeter``) and over a
job's calls (``Totals``); and the log of finished calls that ``/v1/stats`` reads."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from .keys import Keys
from .progress import CHARS_PER_TOKEN, MIN_RATE_S

logger = logging.getLogger(__name__)

CALL_LOG_CAP = 20_000  # rows kept (approximately): the stats window's calls, at most
# Telemetry: a dict of models.LLMTelemetry's fields (built often: every delta of a stream).
Telemetry = dict[str, Any]
# ``on_wait(reason, until)``: like ``JobContext.waiting`` (reason None: moving again).
OnWait = Callable[[str | None, float | None], Awaitable[None]]


def estimate_tokens(chars: int) -> int:
    """Tokens in ``chars`` characters when the server does not say: about 4 a token for
    English with the common BPE vocabularies (no tokenizer works offline for every model)."""
    return -(-chars // CHARS_PER_TOKEN)


@dataclass(frozen=True)
class Price:
    """USD per million tokens, of the prompt and of the answer (``PUSHSVC_LLM_PRICES``)."""

    input_per_m: float
    output_per_m: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        spent = prompt_tokens * self.input_per_m + completion_tokens * self.output_per_m
        return round(spent / 1e6, 8)


def price_of(prices: dict[str, tuple[float, float]], model: str) -> Price | None:
    """The price of ``model`` (the name the job asked for), or None: no cost shown."""
    found = prices.get(model)
    return None if found is None else Price(*found)


def _rate(tokens: int, first: float | None, last: float | None, min_s: float) -> float | None:
    """Tokens a second since the first token; None until the text has lasted ``min_s``."""
    if first is None or last is None or last - first < min_s or last <= first:
        return None
    return round(tokens / (last - first), 1)


class CallMeter:
    """One model call (one try) as its text arrives: token counts are estimated from
    characters while it streams, then the server's usage replaces them (if it sent any)."""

    def __init__(self, model: str, price: Price | None, prompt_chars: int, now: float) -> None:
        self.model = model
        self.price = price
        self.sent = now  # the request
        self.first: float | None = None  # the first token
        self.last: float | None = None  # the latest token
        self.chars = 0
        self.prompt_tokens = estimate_tokens(prompt_chars)
        self.completion_tokens = 0
        self.estimated = True
        self.final = False

    def delta(self, chars: int, now: float) -> None:
        if self.first is None:
            self.first = now
        self.last = now
        self.chars += chars
        self.completion_tokens = estimate_tokens(self.chars)

    def finish(self, prompt_tokens: int, completion_tokens: int, estimated: bool) -> None:
        """The call's end, with its usage (``estimated``: counted from characters)."""
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens
        self.estimated, self.final = estimated, True

    def view(self) -> Telemetry:
        ttft = None if self.first is None else round(self.first - self.sent, 3)
        # Finished: the whole text's rate, however short; streaming: once it means something.
        rate = _rate(self.completion_tokens, self.first, self.last, 0 if self.final else MIN_RATE_S)
        return telemetry(
            self.model, ttft, rate, self.prompt_tokens, self.completion_tokens,
            self.estimated, self.price,
        )  # fmt: skip


def telemetry(
    model: str,
    ttft_s: float | None,
    tokens_per_s: float | None,
    prompt_tokens: int,
    completion_tokens: int,
    estimated: bool,
    price: Price | None,
) -> Telemetry:
    """``models.LLMTelemetry`` as a dict, its cost from ``price`` (None: no cost)."""
    return {
        "model": model,
        "ttft_s": ttft_s,
        "tokens_per_s": tokens_per_s,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "estimated": estimated,
        "cost_usd": None if price is None else price.cost(prompt_tokens, completion_tokens),
    }


class CallWatch:
    """What the job sees of one model call while it runs: its text (``on_delta``), its
    telemetry (``on_telemetry``, a new meter each try) and its waits after a 429
    (``on_wait("rate_limited", until)``, then ``on_wait(None, None)`` once text flows or
    the call ends)."""

    def __init__(
        self,
        model: str,
        price: Price | None,
        prompt_chars: int,
        hooks: CallHooks,
    ) -> None:
        self.hooks = hooks
        self._model, self._price, self._prompt_chars = model, price, prompt_chars
        self.meter = CallMeter(model, price, prompt_chars, time.monotonic())
        self._waiting = False

    def start(self) -> None:
        """A new try: measured from its own request."""
        self.meter = CallMeter(self._model, self._price, self._prompt_chars, time.monotonic())

    @property
    def started(self) -> bool:
        """The try sent text (a failure now ends the call: the text was shown)."""
        return self.meter.first is not None

    async def delta(self, text: str) -> None:
        self.meter.delta(len(text), time.monotonic())
        await self.over()
        if self.hooks.on_delta is not None:
            await self.hooks.on_delta(text)
        if self.hooks.on_telemetry is not None:
            await self.hooks.on_telemetry(self.meter.view())

    async def pause(self, code: str, wait: float) -> None:
        """Wait ``wait`` s before the next try, saying why when the provider asked (429)."""
        if code == "rate_limited" and self.hooks.on_wait is not None:
            self._waiting = True
            await self.hooks.on_wait("rate_limited", time.time() + wait)
        else:  # a 5xx or a lost server: no reason of the contract's fits (not a 429's wait)
            await self.over()
        await asyncio.sleep(wait)

    async def over(self) -> None:
        """The call goes on (or ended): no longer waiting."""
        if self._waiting and self.hooks.on_wait is not None:
            self._waiting = False
            await self.hooks.on_wait(None, None)

    async def finish(
        self, prompt_tokens: int, completion_tokens: int, estimated: bool
    ) -> Telemetry:
        """The call's final telemetry, from its usage; told to ``on_telemetry`` too."""
        await self.over()
        self.meter.finish(prompt_tokens, completion_tokens, estimated)
        final = self.meter.view()
        if self.hooks.on_telemetry is not None:
            await self.hooks.on_telemetry(final)
        return final


@dataclass(frozen=True)
class CallHooks:
    """What a caller of ``LLM.complete`` is told while the call runs (each optional)."""

    on_delta: Callable[[str], Awaitable[None]] | None = None
    on_wait: OnWait | None = None
    on_telemetry: Callable[[Telemetry], Awaitable[None]] | None = None


class Totals:
    """A job's model calls together (``batch``, ``generate_items``): tokens and cost summed
    over the calls (a retried call counts its last try); ``ttft_s`` from the job's first
    request to its first token, ``tokens_per_s`` every call's answer tokens a second since
    then (calls run in parallel: the job's rate, not one call's). Sums are kept as calls
    report, so a delta costs the same with 1,000 calls as with one."""

    def __init__(self, model: str, price: Price | None, now: float) -> None:
        self.model, self.price, self.started = model, price, now
        self.first: float | None = None
        self.last: float | None = None
        self._calls: dict[int, tuple[int, int, bool]] = {}  # by item: prompt, answer, estimated
        self._prompt = self._completion = self._estimated = 0

    def update(self, key: int, call: Telemetry, now: float) -> Telemetry:
        """Take in call ``key``'s latest view; returns the totals."""
        if call["completion_tokens"]:
            self.first = now if self.first is None else self.first
            self.last = now
        prompt, completion, estimated = self._calls.get(key, (0, 0, False))
        self._prompt -= prompt
        self._completion -= completion
        self._estimated -= estimated
        figures = (call["prompt_tokens"] or 0, call["completion_tokens"], bool(call["estimated"]))
        self._calls[key] = figures
        self._prompt += figures[0]
        self._completion += figures[1]
        self._estimated += figures[2]
        return self.view()

    def view(self, final: bool = False) -> Telemetry:
        ttft = None if self.first is None else round(self.first - self.started, 3)
        rate = _rate(self._completion, self.first, self.last, 0 if final else MIN_RATE_S)
        return telemetry(
            self.model, ttft, rate, self._prompt, self._completion,
            self._estimated > 0, self.price,
        )  # fmt: skip


class CallLog:
    """Finished model calls, one row each in a capped Redis stream, for ``/v1/stats``
    (by job type and model; the tenant kept so a tenant sees only its own)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def record(self, job_type: str, tenant: str, call: Telemetry) -> None:
        figures: dict[FieldT, EncodableT] = {k: _text(call[f]) for k, f in ROW_FIELDS.items()}
        try:
            await self._redis.xadd(
                self._keys.llm_calls,
                {"t": job_type, "n": tenant, "m": str(call["model"]), **figures},
                maxlen=CALL_LOG_CAP,
            )
        except RedisError as exc:  # figures for a dashboard: not worth failing a job
            logger.warning("model call not logged for the stats: %s", exc)


# A call log row's short names for LLMTelemetry's figures ("" stands for null).
ROW_FIELDS = {
    "f": "ttft_s",
    "r": "tokens_per_s",
    "p": "prompt_tokens",
    "c": "completion_tokens",
    "e": "estimated",
    "u": "cost_usd",
}


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _number(raw: bytes | None) -> float | None:
    """A call log row's figure (None: null, or not a number)."""
    try:
        value = float(raw) if raw else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, math.ceil(pct / 100 * len(ordered)) - 1)], 3)


def summarize_calls(rows: list[dict[bytes, bytes]]) -> dict[str, dict[str, Any]]:
    """Call log rows (of one job type) by model: calls, time to first token (p50, p95),
    tokens a second (p50), tokens, and cost (null when no call of the model was priced)."""
    by_model: dict[str, list[dict[bytes, bytes]]] = {}
    for row in rows:
        by_model.setdefault(row[b"m"].decode(errors="replace"), []).append(row)
    return {model: _figures(calls) for model, calls in sorted(by_model.items())}


def _figures(rows: list[dict[bytes, bytes]]) -> dict[str, Any]:
    def column(name: str) -> list[float]:
        return [v for row in rows if (v := _number(row.get(name.encode()))) is not None]

    ttft, rates, costs = column("f"), column("r"), column("u")
    return {
        "calls": len(rows),
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p95_s": _percentile(ttft, 95),
        "tokens_per_s_p50": _percentile(rates, 50),
        "prompt_tokens": int(sum(column("p"))),
        "completion_tokens": int(sum(column("c"))),
        "estimated_calls": sum(1 for row in rows if row.get(b"e") == b"1"),
        "cost_usd": round(sum(costs), 8) if costs else None,
    }
