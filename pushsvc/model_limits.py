"""Per-model limits every worker shares (``PUSHSVC_MODEL_LIMITS``): requests and tokens
per window as token buckets, and concurrent calls, kept in Redis by one script per step
(``lua/model_limits.lua``); ``ModelLimiter.hold`` wraps each model call.

How each limit is kept, and why:

- **Requests** (``rpm``): a bucket of one request refilled at ``rpm - 1`` per window, so
  calls start evenly spaced and no window of ``window_s`` holds more than ``rpm`` of them
  even when a request's trip to the server takes up to ``window_s / (rpm - 1)`` longer
  than another's (one request per window is the margin). A bucket as deep as the window
  (a provider's description) starts ``rpm`` calls at once and ``rpm`` more as it refills:
  a server that counts a sliding window answers 429 to the second lot.
- **Tokens** (``tpm``): a bucket of ``tpm`` refilled over the window, charged before the
  call with the prompt's estimate (characters / 4) plus ``max_tokens`` (a typical answer
  when none is given), as OpenAI counts a request against its quota; after the call, the
  real usage is charged on top when it was more, never given back when less (the
  provider counted ``max_tokens`` already).
- **Concurrency**: a sorted set of the calls holding a slot, scored by an expiry their
  worker renews every ``lease_s / 3`` while the call runs: a killed worker's slots free
  themselves after ``PUSHSVC_LEASE_S``.

A call reserves its start in the buckets (they may go below zero) and waits for it,
saying ``waiting: {reason: model_limit, until: start}``, holding its concurrency slot from
then on (starts are handed out in order, so that slot only keeps out calls that would
start after it). It may reserve no further ahead than one call's share of the slowest
bucket plus up to a second (the script's horizon): a cancelled call's unused start then
idles the model for no longer than that (it gives its start back outright when it was the
last one reserved). A call that may not reserve yet, or finds every slot taken, is
refused and asks again: when the horizon reaches its start, or every few hundred ms for a
slot (it says ``until: null``: no one knows when a call ends). The oldest refused call is
first in line: no younger call is served before it, so none waits forever; it asks again
more often. A call cancelled while waiting, or while the script's answer was on its way,
gives back its slot and its place at once. The retry window of ``LLM.complete`` does not
count this wait.
When Redis does not answer, the call goes ahead unlimited (fail open, logged): the
limiter must not fail jobs that the model server itself may well accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from .connections import make_pool
from .keys import Keys
from .progress import CHARS_PER_TOKEN, FIRST_GUESS_TOKENS
from .settings import ModelLimit, Settings

logger = logging.getLogger(__name__)

# What a job is told while its call waits: ``on_wait(reason, until)``, ``on_wait(None,
# None)`` when the call starts (``JobContext.waiting``).
OnWait = Callable[[str | None, float | None], Awaitable[None]]
MODEL_LIMIT = "model_limit"
POLL_S = 0.25  # at most this between two asks for a concurrency slot (jittered)
FIRST_POLL_S = 0.05  # the same, for the call first in line
WARN_EVERY_S = 30.0  # one "Redis is not answering" warning per this, per process


def request_tokens(args: dict[str, Any]) -> int:
    """What a chat request counts against a tokens-per-window limit before it is sent:
    the prompt's estimate plus ``max_tokens`` (else a typical answer)."""
    prompt = sum(len(str(m.get("content", ""))) for m in args.get("messages", []))
    answer = args.get("max_tokens") or FIRST_GUESS_TOKENS
    return math.ceil(prompt / CHARS_PER_TOKEN) + int(answer)


@dataclass(frozen=True)
class Buckets:
    """One model's limits as the script's arguments (rates per ms; 0: no such limit)."""

    concurrency: int
    r_cap: int
    r_rate: float
    t_cap: int
    t_rate: float
    ttl_ms: int  # how long an idle model's buckets are kept

    @classmethod
    def of(cls, limit: ModelLimit) -> Buckets:
        window_ms = limit.window_s * 1000
        return cls(
            concurrency=limit.concurrency or 0,
            r_cap=1 if limit.rpm else 0,
            r_rate=max((limit.rpm or 0) - 1, 1) / window_ms,  # see the module's docstring
            t_cap=limit.tpm or 0,
            t_rate=(limit.tpm or 0) / window_ms,
            ttl_ms=math.ceil(2 * window_ms),
        )


@dataclass
class Held:
    """A call's place under its model's limits, from its grant to its release."""

    model: str
    holder: str
    start_ms: int
    tokens: int
    renewer: asyncio.Task[None] | None = field(default=None, repr=False)


class ModelLimiter:
    """The worker's limiter (one per process, in ``LLM``): its own small Redis pool, made
    on the first limited call; without ``PUSHSVC_MODEL_LIMITS`` it never touches Redis."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.buckets = {m: Buckets.of(limit) for m, limit in settings.model_limits.items()}
        self.keys = Keys(settings.namespace)
        self.hold_ms = math.ceil(settings.lease_s * 1000)
        self._redis: Redis | None = None
        self._script: Any = None
        self._ids = (f"{secrets.token_hex(6)}.{n}" for n in itertools.count())
        self._warned_at = -math.inf

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            await self._redis.connection_pool.disconnect()

    @contextlib.asynccontextmanager
    async def hold(self, model: str, tokens: int, on_wait: OnWait | None) -> AsyncIterator[None]:
        """Wait until ``model``'s limits let a call of ``tokens`` start, and hold its place
        while the body (the call) runs; ``on_wait`` hears of the wait and of its end."""
        held = await self.acquire(model, tokens, on_wait) if model in self.buckets else None
        try:
            yield
        finally:
            if held is not None:
                await self.release(held)

    async def used(self, model: str, tokens: int, actual: int) -> None:
        """A call reserved ``tokens`` and used ``actual``: charge what it used beyond."""
        b = self.buckets.get(model)
        if b is not None and b.t_cap and actual > tokens:
            await self._call("charge", model, actual - tokens, b.ttl_ms)

    async def acquire(self, model: str, tokens: int, on_wait: OnWait | None) -> Held | None:
        """The call's grant once it may start (None: Redis did not answer, go ahead)."""
        holder, wait = next(self._ids), _Wait(on_wait)
        try:
            granted = await self._turn(model, holder, tokens, wait)
        except BaseException:
            await self._call("release", model, holder, 0, 0)  # its place in line
            raise
        if granted is None:
            return None
        start_ms, now_ms = granted
        held = Held(model, holder, start_ms, tokens)
        concurrent = self.buckets[model].concurrency
        held.renewer = asyncio.create_task(self._renew(held)) if concurrent else None
        try:
            if start_ms > now_ms:  # a reserved start: wait for it, saying until when
                await wait.says(start_ms / 1000, exact=True)
                await asyncio.sleep((start_ms - now_ms) / 1000)
            await wait.ends()
        except BaseException:
            await self.release(held)
            raise
        return held

    async def _turn(
        self, model: str, holder: str, tokens: int, wait: _Wait
    ) -> tuple[int, int] | None:
        """Ask until the script grants the call a start: (start_ms, now_ms)."""
        first = 0
        while True:
            reply = await self._ask(model, holder, tokens, first)
            if reply is None:
                return None
            if int(reply[0]):
                return int(reply[1]), int(reply[2])
            _, start_ms, now_ms, first, ask_in_ms, first_in_line = (int(v) for v in reply)
            await wait.says(start_ms / 1000 if start_ms > now_ms else None)
            await asyncio.sleep(_pause(ask_in_ms, bool(first_in_line)))

    async def _ask(self, model: str, holder: str, tokens: int, first: int) -> Any:
        """One ask; cancelled while it is on its way, the call waits for the answer and
        gives back what it was granted (else its slot would stay taken for ``lease_s``)."""
        b = self.buckets[model]
        ask = asyncio.ensure_future(
            self._call(
                "acquire",
                model,
                holder,
                self.hold_ms,
                b.concurrency,
                b.r_cap,
                repr(b.r_rate),
                b.t_cap,
                repr(b.t_rate),
                tokens,
                b.ttl_ms,
                first,
            )  # fmt: skip
        )
        try:
            return await asyncio.shield(ask)
        except asyncio.CancelledError:
            reply = await ask
            if reply is not None and int(reply[0]):
                await self._call("release", model, holder, int(reply[1]), tokens)
            raise

    async def release(self, held: Held) -> None:
        """Free the call's concurrency slot; a call that never started gives back its
        reservation (the script decides whether it may)."""
        if held.renewer is not None:
            held.renewer.cancel()
            await asyncio.gather(held.renewer, return_exceptions=True)
        await self._call("release", held.model, held.holder, held.start_ms, held.tokens)

    async def _renew(self, held: Held) -> None:
        while True:
            await asyncio.sleep(self.hold_ms / 3000)
            if await self._call("renew", held.model, held.holder, self.hold_ms) == 0:
                logger.warning("model %s: a call's concurrency slot lapsed", held.model)

    async def _call(self, op: str, model: str, *args: Any) -> Any:
        """One run of the script, or None when Redis does not answer (fail open)."""
        keys = [self.keys.model_buckets(model), self.keys.model_holders(model)]
        try:
            return await self._run_script()(keys=keys, args=[op, *args])
        except (RedisError, OSError) as exc:
            if time.monotonic() - self._warned_at >= WARN_EVERY_S:
                self._warned_at = time.monotonic()
                logger.warning("model limits not applied, Redis did not answer: %r", exc)
            return None

    def _run_script(self) -> Any:
        if self._script is None:
            pool = make_pool(
                self.settings, max_connections=4, socket_connect_timeout=2, socket_timeout=5
            )
            self._redis = Redis(connection_pool=pool)
            text = (resources.files(__package__) / "lua" / "model_limits.lua").read_text()
            self._script = self._redis.register_script(text)
        return self._script


def _pause(ask_in_ms: int, first_in_line: bool) -> float:
    """How long a refused call waits before it asks again (``ask_in_ms`` -1: for a slot).
    Only the call first in line asks at once when its start comes within reach; the others
    are spread out, so many waiting calls do not all ask at the same moment."""
    if first_in_line:
        return FIRST_POLL_S if ask_in_ms < 0 else max(ask_in_ms, 5) / 1000
    spread = POLL_S * random.uniform(0.5, 1.0)
    return spread if ask_in_ms < 0 else max(ask_in_ms / 1000, spread)


@dataclass
class _Wait:
    """What the job was told of its call's wait: a new estimate is told only when it
    differs in kind (a time, or unknown) or the one told has passed, not at every ask."""

    on_wait: OnWait | None
    told: bool = False
    until: float | None = None

    async def says(self, until: float | None, exact: bool = False) -> None:
        if self.on_wait is None:
            return
        if self.told and not exact and (until is None) == (self.until is None):
            if self.until is None or time.time() < self.until:
                return
        if self.told and until == self.until:
            return
        self.told, self.until = True, until
        await self.on_wait(MODEL_LIMIT, until)

    async def ends(self) -> None:
        if self.told and self.on_wait is not None:
            await self.on_wait(None, None)
