"""Job types: the ``@job_type`` decorator, the registry, and the context a job function gets."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from jsonschema import Draft202012Validator
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .llm import LLM
from .models import JobStatus
from .settings import Settings
from .store import JobStore, Published

logger = logging.getLogger(__name__)
P = TypeVar("P", bound=BaseModel)
JobFunc = Callable[["JobContext", Any], Awaitable[Any]]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, for retryable errors only."""

    base_s: float = 1.0
    max_s: float = 60.0


@dataclass(frozen=True)
class JobType(Generic[P]):  # noqa: B903
    name: str
    func: JobFunc
    payload_model: type[P]
    timeout_s: float
    max_attempts: int
    retry: RetryPolicy
    description: str = ""

    @functools.cached_property
    def _validator(self) -> Draft202012Validator:
        return Draft202012Validator(self.payload_model.model_json_schema())

    def schema_errors(self, payload: Any) -> list[dict[str, Any]]:
        """Where ``payload`` breaks the type's published JSON Schema (empty: it fits)."""
        return [
            {"loc": ["payload", *map(str, e.absolute_path)], "msg": e.message, "type": e.validator}
            for e in self._validator.iter_errors(payload)
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "timeout_s": self.timeout_s,
            "max_attempts": self.max_attempts,
            "payload_schema": self.payload_model.model_json_schema(),
        }


@dataclass
class Registry:
    types: dict[str, JobType[Any]] = field(default_factory=dict)

    def add(self, job_type: JobType[Any]) -> None:
        if job_type.name in self.types:
            raise ValueError(f"job type {job_type.name!r} is registered twice")
        self.types[job_type.name] = job_type

    def get(self, name: str) -> JobType[Any] | None:
        return self.types.get(name)


# The registry decorated functions join; like a route table, it is filled at import time.
registry = Registry()


def job_type(
    name: str,
    *,
    payload: type[BaseModel],
    timeout_s: float = 300.0,
    max_attempts: int = 3,
    retry: RetryPolicy | None = None,
    target: Registry | None = None,
) -> Callable[[JobFunc], JobFunc]:
    """Register ``async def fn(ctx, payload)`` as the job type ``name``."""

    def decorate(func: JobFunc) -> JobFunc:
        (target or registry).add(
            JobType(
                name=name,
                func=func,
                payload_model=payload,
                timeout_s=timeout_s,
                max_attempts=max_attempts,
                retry=retry or RetryPolicy(),
                description=(func.__doc__ or "").strip().split("\n")[0],
            )
        )
        return func

    return decorate


class Resources:
    """Clients a worker's job functions share, made on first use and closed with it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._llm: LLM | None = None

    @property
    def llm(self) -> LLM:
        if self._llm is None:
            self._llm = LLM(self.settings)
        return self._llm

    async def aclose(self) -> None:
        if self._llm is not None:
            await self._llm.aclose()


class JobContext:
    """What a job function uses to report: progress, stage, output, and cancellation.

    Progress and output are throttled: at most ``rate_hz`` flushes a second, each flush
    publishing the latest progress (merged) and the output written since (concatenated),
    so a fast token stream cannot flood Redis and no text is lost. Every write names the
    attempt, so a superseded attempt cannot touch the job.
    """

    def __init__(
        self,
        store: JobStore,
        fields: dict[str, Any],
        rate_hz: float,
        resources: Resources | None = None,
    ) -> None:
        self.resources = resources or Resources(store.settings)
        self.job_id: str = fields["id"]
        self.tenant: str = fields["tenant"]
        self.attempt: int = fields["attempt"]
        # Runs count POST /retry re-runs; attempts restart at 1 in each run.
        self.run: int = fields.get("run", 1)
        self._arq_id: str = fields["arq_id"]
        self._store = store
        self._interval = 1.0 / rate_hz
        self._started = time.monotonic()
        self._progress = 0.0
        self._stage: str | None = None
        self._message: str | None = None
        self._progress_dirty = False
        self._output: list[str] = []
        self._last_flush = 0.0
        self._timer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._cancelled = False

    @property
    def llm(self) -> LLM:
        """The worker's model client (``pushsvc.llm.LLM``)."""
        return self.resources.llm

    @property
    def is_cancelled(self) -> bool:
        """True once a cancel was requested; long loops should check it and stop."""
        return self._cancelled

    async def progress(
        self, pct: float, stage: str | None = None, message: str | None = None
    ) -> None:
        # Never decreasing within an attempt, always within 0..100.
        self._progress = max(self._progress, min(100.0, max(0.0, float(pct))))
        if stage is not None:
            self._stage = stage
        if message is not None:
            self._message = message
        self._progress_dirty = True
        await self._maybe_flush()

    async def stage(self, name: str, message: str | None = None) -> None:
        await self.progress(self._progress, stage=name, message=message)

    async def output(self, delta: str) -> None:
        if delta:
            self._output.append(delta)
            await self._maybe_flush()

    def eta_s(self) -> float | None:
        if self._progress <= 0:
            return None
        elapsed = time.monotonic() - self._started
        return round(elapsed * (100 - self._progress) / self._progress, 2)

    async def _maybe_flush(self) -> None:
        wait = self._last_flush + self._interval - time.monotonic()
        if wait <= 0:
            await self.flush(final=False)
        elif self._timer is None or self._timer.done():
            self._timer = asyncio.create_task(self._flush_later(wait))

    async def _flush_later(self, wait: float) -> None:
        await asyncio.sleep(wait)
        await self.flush(final=False)

    async def flush(self, *, final: bool = True) -> None:
        """Publish whatever is pending now.

        A Redis error keeps everything pending for the next flush; only a ``final``
        flush (the one before the terminal event) raises it.
        """
        async with self._lock:
            self._last_flush = time.monotonic()
            try:
                await self._send_pending()
            except (RedisConnectionError, RedisTimeoutError):
                if final:
                    raise
                logger.warning("job %s: progress kept for the next flush", self.job_id)

    async def _send_pending(self) -> None:
        if self._progress_dirty:
            self._progress_dirty = False
            data = {
                "progress": round(self._progress, 2),
                "stage": self._stage,
                "message": self._message,
                "eta_s": self.eta_s(),
            }
            try:
                self._note(
                    await self._store.publish(
                        self.job_id,
                        self.tenant,
                        "progress",
                        data,
                        data,
                        expect=(JobStatus.RUNNING,),
                        arq_id=self._arq_id,
                    )
                )
            except BaseException:
                self._progress_dirty = True
                raise
        if self._output:
            delta, self._output = "".join(self._output), []
            try:
                self._note(
                    await self._store.publish(
                        self.job_id,
                        self.tenant,
                        "output",
                        {"delta": delta},
                        delta=delta,
                        expect=(JobStatus.RUNNING,),
                        arq_id=self._arq_id,
                    )
                )
            except BaseException:
                self._output.insert(0, delta)  # not lost: sent with the next flush
                raise

    def _note(self, reply: object) -> None:
        if isinstance(reply, Published) and reply.cancel_requested:
            self._cancelled = True

    async def close(self) -> None:
        """Stop the flush timer; pending updates are flushed by the caller first."""
        if self._timer is not None and not self._timer.done():
            self._timer.cancel()
            # gather, not a bare await + except: a cancel aimed at *us* must propagate.
            await asyncio.gather(self._timer, return_exceptions=True)
