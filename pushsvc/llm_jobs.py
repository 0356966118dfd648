"""The LLM job types: ``generate`` (one streamed answer), ``generate_items`` and ``batch``
(many calls under a parallel limit, with per-item progress and partial success).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .answers import Completion
from .backoff import FullJitterBackoff, floored
from .context import JobContext
from .errors import JobError
from .jobs import job_type
from .progress import Gauge
from .telemetry import Telemetry, Totals, price_of

ITEM_TRIES = 3  # per item, for malformed output and retryable upstream errors
# Before an item's second and third try: up to 0.2 s, then up to 0.4 s.
ITEM_BACKOFF = FullJitterBackoff(cap=0.4, base=0.2)
# What one item gives: its entry in the result, and the model call that made it.
Made = tuple[dict[str, Any], Completion]
# A letter first: pydantic refuses model fields named "_x" or "__proto__".
FIELD_NAME = r"^[a-z][a-z0-9_]{0,39}$"


class GeneratePayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=100_000)
    system: str | None = Field(None, max_length=20_000)
    model: str | None = Field(None, max_length=200, description="default: PUSHSVC_LLM_MODEL")
    max_tokens: int = Field(512, ge=1, le=32_768)
    expected_tokens: int | None = Field(
        None, ge=1, le=32_768, description="how long the answer is likely to be (progress)"
    )
    temperature: float | None = Field(None, ge=0, le=2)


@job_type("generate", payload=GeneratePayload, timeout_s=600, max_attempts=3)
async def generate(ctx: JobContext, p: GeneratePayload) -> dict[str, Any]:
    """Streams the model's answer to a prompt as output, with progress and ETA from the
    text received, the answer's expected length and the measured rate."""
    model = p.model or ctx.llm.default_model
    lengths = ctx.answer_lengths
    gauge = Gauge(await lengths.expected(ctx.job_type, model, p.expected_tokens, p.max_tokens))

    async def on_delta(text: str) -> None:
        await ctx.output(text)
        pct, eta = gauge.add(len(text), time.monotonic())
        await ctx.progress(pct, "generating", eta_s=eta)

    await ctx.stage("generating")
    messages = ([{"role": "system", "content": p.system}] if p.system else []) + [
        {"role": "user", "content": p.prompt}
    ]
    done = await ctx.llm.complete(
        messages,
        model=p.model,
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        on_delta=on_delta,
        job_type=ctx.job_type,
        on_wait=ctx.waiting,
        on_telemetry=ctx.telemetry,
    )
    await lengths.record(ctx.job_type, model, len(done.text))
    await ctx.call_log.record(ctx.job_type, ctx.tenant, done.telemetry)
    await ctx.stage("finalizing")
    return {
        "text": done.text,
        "model": done.model,
        "usage": dataclasses.asdict(done.usage),
        **finish_of(done),
        "llm": done.telemetry,
    }


class Calls:
    """What a job's many model calls show together: one ``waiting`` (while any call waits
    after a 429, until the earliest retry) and the totals of their telemetry
    (``telemetry.Totals``), published as the job's ``llm``."""

    def __init__(self, ctx: JobContext, model: str | None) -> None:
        self.ctx = ctx
        name = model or ctx.llm.default_model
        self.totals = Totals(name, price_of(ctx.llm.prices, name), time.monotonic())
        self._waits: dict[int, tuple[str, float | None]] = {}  # by item

    def hooks(self, i: int) -> dict[str, Any]:
        """``LLM.complete``'s ``on_wait`` and ``on_telemetry`` for item ``i``'s call."""

        async def on_wait(reason: str | None, until: float | None) -> None:
            if reason is None:
                self._waits.pop(i, None)
            else:
                self._waits[i] = (reason, until)
            await self._say_waiting()

        async def on_telemetry(llm: Telemetry) -> None:
            await self.ctx.telemetry(self.totals.update(i, llm, time.monotonic()))

        return {"on_wait": on_wait, "on_telemetry": on_telemetry}

    async def _say_waiting(self) -> None:
        if not self._waits:
            await self.ctx.waiting(None)
            return
        soonest = min(self._waits.values(), key=lambda w: w[1] or float("inf"))
        await self.ctx.waiting(*soonest)

    async def final(self) -> Telemetry:
        """The totals at the end, published as the job's ``llm`` and put in its result."""
        final = self.totals.view(final=True)
        await self.ctx.telemetry(final)
        return final


def finish_of(done: Completion) -> dict[str, Any]:
    """How a model answer ended: ``finish_reason``, and ``truncated`` when it was cut."""
    return {"finish_reason": done.finish_reason, "truncated": done.truncated}


class ItemsPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(min_length=1, max_length=100, description="e.g. persona, faction")
    theme: str = Field(min_length=1, max_length=2_000)
    count: int = Field(5, ge=1, le=50)
    fields: list[Annotated[str, Field(pattern=FIELD_NAME)]] = Field(
        default_factory=list, max_length=20, description="extra string fields per item"
    )
    failure_tolerance: float = Field(0.2, ge=0, le=1)
    parallel: int | None = Field(None, ge=1, le=16)
    model: str | None = Field(None, max_length=200)
    max_tokens: int = Field(512, ge=1, le=32_768, description="per item")

    def keys(self) -> list[str]:
        return list(dict.fromkeys(["name", "description", *self.fields]))


@job_type("generate_items", payload=ItemsPayload, timeout_s=900, max_attempts=2)
async def generate_items(ctx: JobContext, p: ItemsPayload) -> dict[str, Any]:
    """Generates `count` validated JSON items concurrently; each is published as it lands."""
    keys = p.keys()
    item_model = create_model(  # type: ignore[call-overload]
        "Item",
        __config__=ConfigDict(extra="ignore"),
        **{k: (str, Field(min_length=1)) for k in keys},
    )

    calls = Calls(ctx, p.model)

    async def make(i: int) -> Made:
        prompt = (
            f"Create {p.kind} number {i + 1} of {p.count} for this theme: {p.theme}\n"
            f"Answer with one JSON object.\nJSON keys: {', '.join(keys)}"
        )
        done = await ctx.llm.complete(
            [{"role": "user", "content": prompt}],
            model=p.model,
            max_tokens=p.max_tokens,
            json_mode=True,
            job_type=ctx.job_type,
            **calls.hooks(i),
        )
        try:
            item: dict[str, Any] = item_model.model_validate(json.loads(done.text)).model_dump()
        except (ValueError, ValidationError) as exc:
            cut = f" (the answer was cut: {done.finish_reason})" if done.truncated else ""
            raise JobError(
                f"item {i + 1} is not valid{cut}: {exc}"[:300],
                code="malformed_item",
                retryable=True,
            ) from exc
        return item, done

    # Items are the caller's objects (any field name): how each answer ended goes beside them.
    return await run_items(
        ctx, calls, p.count, make, p.parallel, p.failure_tolerance, "items", inline_finish=False
    )


class BatchPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    template: str = Field(
        min_length=1,
        max_length=20_000,
        pattern=r"\{input\}",
        description="the prompt; {input} is replaced by each input",
    )
    inputs: list[str] = Field(min_length=1, max_length=1000)
    parallel: int | None = Field(None, ge=1, le=16)
    failure_tolerance: float = Field(0.2, ge=0, le=1)
    model: str | None = Field(None, max_length=200)
    max_tokens: int = Field(256, ge=1, le=32_768)


@job_type("batch", payload=BatchPayload, timeout_s=3600, max_attempts=2)
async def batch(ctx: JobContext, p: BatchPayload) -> dict[str, Any]:
    """Applies a prompt template to every input; partial success within a tolerance."""
    calls = Calls(ctx, p.model)

    async def make(i: int) -> Made:
        prompt = p.template.replace("{input}", p.inputs[i])
        done = await ctx.llm.complete(
            [{"role": "user", "content": prompt}],
            model=p.model,
            max_tokens=p.max_tokens,
            job_type=ctx.job_type,
            **calls.hooks(i),
        )
        return {"input": p.inputs[i], "output": done.text}, done

    return await run_items(
        ctx,
        calls,
        len(p.inputs),
        make,
        p.parallel,
        p.failure_tolerance,
        "outputs",
        inline_finish=True,
    )


class _ToleranceExceeded(Exception):
    """Raised in an item's task once failures exceed the tolerance: the job's outcome is
    decided, so the items still running are stopped."""


async def run_items(
    ctx: JobContext,
    calls: Calls,
    count: int,
    make: Callable[[int], Awaitable[Made]],
    parallel: int | None,
    tolerance: float,
    name: str,
    *,
    inline_finish: bool,
) -> dict[str, Any]:
    """Run ``make(i)`` for every item under a parallel limit, publishing each as it lands.

    A retryable error or malformed item is tried again (up to ``ITEM_TRIES``), then
    counted as failed; a fatal one (a bad request, bad credentials) counts at once.
    Failures within ``tolerance`` leave the job completed; past it the job fails with
    ``too_many_failures`` at once, retryable when every failure was. The result's
    ``llm`` is the totals over each item's last call (``Calls``).
    """
    gate = asyncio.Semaphore(parallel or ctx.resources.settings.llm_parallel)
    made: list[Made | None] = [None] * count
    errors: list[dict[str, Any]] = []

    async def one(i: int) -> None:
        async with gate:
            item, error = await _with_retries(make, i)
        made[i] = item
        if item is not None:
            await ctx.output(json.dumps({"index": i, **item[0]}) + "\n")
            await ctx.call_log.record(ctx.job_type, ctx.tenant, item[1].telemetry)
        else:
            errors.append({"index": i, **(error or {})})
        done = count - made.count(None) + len(errors)
        await ctx.progress(100 * done / count, "generating", f"{done}/{count} {name}")
        if len(errors) > tolerance * count:
            raise _ToleranceExceeded

    await _run_all(count, one)
    await ctx.stage("finalizing")
    outcome = {**_outcome(made, errors, name, inline_finish), "llm": await calls.final()}
    if len(errors) > tolerance * count:
        raise _too_many_failures(errors, count, name, tolerance, outcome)
    return outcome


async def _run_all(count: int, one: Callable[[int], Coroutine[Any, Any, None]]) -> None:
    """``one(i)`` for every item, in one task group; an item's error (not the tolerance
    stopping the rest) is raised as itself, not as the group."""
    try:
        async with asyncio.TaskGroup() as group:
            for i in range(count):
                group.create_task(one(i))
    except BaseExceptionGroup as group_error:
        bugs = [e for e in group_error.exceptions if not isinstance(e, _ToleranceExceeded)]
        if bugs:  # surface the error, not the group
            raise bugs[0] from None


def _too_many_failures(
    errors: list[dict[str, Any]], count: int, name: str, tolerance: float, outcome: dict[str, Any]
) -> JobError:
    """The job's error past the tolerance: retryable when every failure was."""
    codes = Counter(e["code"] for e in errors).most_common()
    return JobError(
        f"{len(errors)} of {count} {name} failed (tolerance {tolerance:g}): "
        + ", ".join(f"{n} {code}" for code, n in codes),
        code="too_many_failures",
        retryable=all(e["retryable"] for e in errors),
        result=outcome,
    )


def _outcome(
    made: list[Made | None], errors: list[dict[str, Any]], name: str, inline_finish: bool
) -> dict[str, Any]:
    landed = [(i, m[0], finish_of(m[1])) for i, m in enumerate(made) if m is not None]
    outcome: dict[str, Any] = {
        name: [{**entry, **finish} if inline_finish else entry for _, entry, finish in landed],
        "failed": len(errors),
        # Stopped or never started: the tolerance was exceeded first.
        "skipped": len(made) - len(landed) - len(errors),
        "errors": sorted(errors, key=lambda e: e["index"]),
    }
    if not inline_finish:  # one per entry of ``name``, in the same order
        outcome["answers"] = [{"index": i, **finish} for i, _, finish in landed]
    return outcome


async def _with_retries(
    make: Callable[[int], Awaitable[Made]], i: int
) -> tuple[Made | None, dict[str, Any] | None]:
    error: dict[str, Any] | None = None
    for attempt in range(1, ITEM_TRIES + 1):
        try:
            return await make(i), None
        except JobError as exc:
            error = {"code": exc.code, "message": exc.message, "retryable": exc.retryable}
            if not exc.retryable:
                break  # another try would fail the same way
            if attempt < ITEM_TRIES:  # backoff with jitter, at least the server's Retry-After
                await asyncio.sleep(floored(ITEM_BACKOFF, attempt - 1, exc.retry_after_s))
    return None, error
