"""What a job function gets: ``JobContext`` (throttled progress and output, the attempt's
writes, repair and supersede) and the worker's shared ``Resources``."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import secrets
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import transitions
from .fields import EVENT_EXCLUDE, to_snapshot
from .llm import LLM
from .models import JobStatus
from .progress import AnswerLengths
from .publish import Diverged, PublishCall, Published, Rejected, Reply, Writer
from .settings import Settings
from .store import JobStore
from .telemetry import CallLog, Telemetry
from .transitions import Transition

logger = logging.getLogger(__name__)


class Resources:
    """Clients a worker's job functions share, made on first use and closed with it."""

    def __init__(
        self, settings: Settings, observe_llm: Callable[[Telemetry], None] | None = None
    ) -> None:
        self.settings = settings
        self._observe_llm = observe_llm  # every model call's telemetry (worker metrics)
        self._llm: LLM | None = None
        self._lengths: AnswerLengths | None = None
        self._calls: CallLog | None = None

    @property
    def llm(self) -> LLM:
        if self._llm is None:
            self._llm = LLM(self.settings, self._observe_llm)
        return self._llm

    def call_log(self, store: JobStore) -> CallLog:
        if self._calls is None:
            self._calls = CallLog(store.queue.redis, store.keys)
        return self._calls

    def answer_lengths(self, store: JobStore) -> AnswerLengths:
        if self._lengths is None:
            self._lengths = AnswerLengths(store.queue.redis, store.keys)
        return self._lengths

    async def aclose(self) -> None:
        if self._llm is not None:
            await self._llm.aclose()


def _rounded(until: float | None) -> float | None:
    return None if until is None else round(until, 3)


# What a repair keeps of the stored job: the attempt's identity and inputs.
REPAIR_KEEP = (
    "id",
    "type",
    "tenant",
    "payload",
    "priority",
    "attempt",
    "max_attempts",
    "run",
    "arq_id",
    "created_at",
    "started_at",
    "error",
)


class JobContext:
    """What a job function uses to report: progress, stage, output, and cancellation.

    Progress and output are throttled: at most ``rate_hz`` flushes a second, each flush
    publishing the latest progress (merged) and the output written since (concatenated),
    so a fast token stream cannot flood Redis and no text is lost. Every write names the
    attempt and its owner, so a superseded attempt cannot touch the job (and stops), and
    the last position the attempt published, so a store that lost or rewound the job
    is noticed and rewritten from what the attempt holds (:meth:`repair`).
    """

    def __init__(
        self,
        store: JobStore,
        fields: dict[str, Any],
        rate_hz: float,
        resources: Resources | None = None,
        writer: Writer | None = None,
    ) -> None:
        self.resources = resources or Resources(store.settings)
        self.job_id: str = fields["id"]
        self.job_type: str = fields["type"]
        self.tenant: str = fields["tenant"]
        self.attempt: int = fields["attempt"]
        # Runs count POST /retry re-runs; attempts restart at 1 in each run.
        self.run: int = fields.get("run", 1)
        self.fields = fields
        self.writer = writer or Writer(fields["arq_id"])
        self.task: asyncio.Task[Any] | None = None  # the job function, once started
        self.superseded = False
        self._store = store
        self._interval = 1.0 / rate_hz
        self._started = time.monotonic()
        self._progress = 0.0
        self._eta: float | None = None  # the job's own estimate, when it gives one
        self._stage: str | None = None
        self._message: str | None = None
        self._waiting: dict[str, Any] | None = None  # why the attempt is not moving
        self._llm: dict[str, Any] | None = None  # the model call's telemetry
        self._progress_dirty = False
        self._output: list[str] = []  # written, not yet published
        # A flush whose write failed, and its token: sent again as it was before anything
        # newer, so that one Redis ran already (its reply lost) is not made twice.
        self._unsent: tuple[Transition, str] | None = None
        self._text: list[str] = []  # published this attempt: what a repair rewrites
        self._last_flush = -math.inf  # the first write flushes at once (uptime may be short)
        self._timer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one flush at a time
        self._write_lock = asyncio.Lock()  # one write (and repair) at a time
        self._cancelled = False

    @property
    def llm(self) -> LLM:
        """The worker's model client (``pushsvc.llm.LLM``)."""
        return self.resources.llm

    @property
    def answer_lengths(self) -> AnswerLengths:
        """How long answers of a job type and model ran lately (``pushsvc.progress``)."""
        return self.resources.answer_lengths(self._store)

    @property
    def call_log(self) -> CallLog:
        """Finished model calls, for ``/v1/stats`` (``pushsvc.telemetry``)."""
        return self.resources.call_log(self._store)

    @property
    def is_cancelled(self) -> bool:
        """True once a cancel was requested; long loops should check it and stop."""
        return self._cancelled

    async def progress(
        self,
        pct: float,
        stage: str | None = None,
        message: str | None = None,
        eta_s: float | None = None,
    ) -> None:
        """Report progress; ``eta_s``: the job's own estimate of the time left (else it
        is extrapolated from the progress so far)."""
        # Never decreasing within an attempt, always within 0..100.
        self._progress = max(self._progress, min(100.0, max(0.0, float(pct))))
        self._eta = eta_s
        if stage is not None:
            self._stage = stage
        if message is not None:
            self._message = message
        self._progress_dirty = True
        await self._maybe_flush()

    async def waiting(self, reason: str | None, until: float | None = None) -> None:
        """Say why the attempt is not moving (``rate_limited``, ``model_limit``) and until
        when (epoch seconds; ``None``: unknown); ``reason=None`` says it moves again.
        A new reason is published at once (a wait is news), a new ``until`` alone with the
        throttle, as a ``progress`` event's ``waiting``."""
        waiting = None if reason is None else {"reason": reason, "until": _rounded(until)}
        if waiting == self._waiting:
            return
        same_reason = (self._waiting or {}).get("reason") == reason
        self._waiting = waiting
        self._progress_dirty = True
        if same_reason:  # only ``until`` moved (parallel calls): with the throttle
            await self._maybe_flush()
        else:
            await self.flush(final=False)

    async def telemetry(self, llm: dict[str, Any]) -> None:
        """The model call's telemetry (``models.LLMTelemetry``'s fields), published with
        the next throttled flush as a ``progress`` event's ``llm``."""
        if llm != self._llm:
            self._llm = dict(llm)
            self._progress_dirty = True
            await self._maybe_flush()

    async def stage(self, name: str, message: str | None = None) -> None:
        await self.progress(self._progress, stage=name, message=message)

    async def output(self, delta: str) -> None:
        if delta:
            self._output.append(delta)
            await self._maybe_flush()

    def eta_s(self) -> float | None:
        if self._eta is not None:
            return round(self._eta, 2)
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

    def _progress_data(self) -> dict[str, Any]:
        return {
            "progress": round(self._progress, 2),
            "stage": self._stage,
            "message": self._message,
            "eta_s": self.eta_s(),
            "waiting": self._waiting,
            "llm": self._llm,
        }

    async def _send_pending(self) -> None:
        """The flush that failed last, as it was (its token says to the script whether it
        ran: a reply lost after Redis ran it is not made twice), then what is pending."""
        if self._unsent is not None:
            await self._write(*self._unsent)
        data = self._progress_data() if self._progress_dirty else None
        delta, self._output = "".join(self._output), []
        self._progress_dirty = False
        change = transitions.flush(data, delta)
        if change is None:
            return
        self._unsent = (change, secrets.token_hex(8))  # until it is known to be made
        await self._write(*self._unsent)

    async def _write(self, change: Transition, call: str) -> None:
        """One flushed write, finished even if the flush is cancelled midway (the job
        ending, a cancel); once made, it is no longer the one to send again."""

        async def write() -> None:
            await self.apply(change, call)
            if self._unsent is not None and self._unsent[1] == call:
                self._unsent = None

        await asyncio.shield(asyncio.ensure_future(write()))

    async def apply(self, change: Transition, call: str = "") -> Reply:
        """Publish ``change`` as this attempt; repair the stored job first when the store
        lost or rewound it, and stop the attempt when it is no longer this worker's.
        ``call``: the change's token, the same when it is sent again (lua/publish.lua)."""
        async with self._write_lock:
            reply = await self._send(change, call)
            if isinstance(reply, Diverged) or reply is None:
                repaired = await self._repair(pending=change.text)
                if not isinstance(repaired, Published) or change.text:
                    return repaired  # an output delta went into the repaired text
                reply = await self._send(change, call)
            if isinstance(reply, Published):
                self._note(reply, change.text)
            elif isinstance(reply, Rejected):
                self.supersede()
            return reply

    async def _send(self, change: Transition, call: str = "") -> Reply:
        writer = dataclasses.replace(self.writer, call=call) if call else self.writer
        return await transitions.publish(
            self._store, self.job_id, self.tenant, change, writer=writer
        )

    def _note(self, reply: Published, delta: str) -> None:
        self.writer = dataclasses.replace(self.writer, known=reply.position)
        if delta:
            self._text.append(delta)
        if reply.cancel_requested:
            self._cancelled = True

    async def _repair(self, pending: str) -> Reply:
        fields = {k: self.fields[k] for k in REPAIR_KEEP if k in self.fields}
        fields.update(self._progress_data(), status="running", owner=self.writer.owner)
        fields.update(result=None, finished_at=None)
        text = "".join(self._text) + pending
        data = to_snapshot({**fields, "output": text}).model_dump(
            mode="json", exclude=EVENT_EXCLUDE
        )
        call = PublishCall(
            self.job_id,
            self.tenant,
            "snapshot",
            {**data, "reset": True},
            {**fields, "output": ""},
            delta=text,
            writer=self.writer,
            index_score=int(self.fields["created_at"] * 1000),
        )
        reply = await self._store.repair(call)
        if isinstance(reply, Published):
            logger.warning("job %s: the store lost or rewound it; rewrote it", self.job_id)
            self._note(reply, pending)
            # Its lease too, if that went with the job (a Redis that came back empty).
            until = (time.time() + self._store.settings.lease_s) * 1000
            leases = self._store.keys.leases
            await self._store.queue.redis.zadd(leases, {self.writer.arq_id: until})
        else:
            self.supersede()
        return reply

    async def keep_lease(self, until_ms: float) -> str:
        """The lease check: renew the lease while the attempt is ours and the store
        holds what it published; else repair the store, or stop the attempt."""
        async with self._write_lock:
            keys = self._store.keys
            row = await self._store.redis.hmget(  # type: ignore[misc]
                keys.job(self.tenant, self.job_id), ["status", "arq_id", "owner", "epoch", "seq"]
            )
            verdict = self.verdict(row)
            if verdict == "ok":
                async with self._store.queue.redis.pipeline(transaction=False) as pipe:
                    # Added again if the queue's Redis lost it (job state being on
                    # another: two planes); one the reaper took over from is not this
                    # attempt's any more (the verdict), and is dropped if re-added.
                    pipe.zadd(keys.leases, {self.writer.arq_id: until_ms})
                    # Whose it is, kept while it runs: the reaper's way to it (leases.py).
                    ttl = self._store.settings.job_ttl_s
                    pipe.set(keys.job_tenant(self.job_id), self.tenant, ex=ttl)
                    await pipe.execute()
            elif verdict == "repair":
                await self._repair(pending="")
            else:
                self.supersede()
            return verdict

    def verdict(self, row: list[bytes | None]) -> str:
        """From the stored (status, arq id, owner, epoch, seq): is the attempt ``ok``,
        does the store need a ``repair``, or was the attempt ``superseded``?"""
        status, arq_id, owner, epoch, seq = (v.decode() if v else None for v in row)
        known = self.writer.known
        if status is None:
            return "repair"
        if known is not None and (epoch != known.epoch or int(seq or 0) < known.seq):
            return "repair"
        mine = arq_id == self.writer.arq_id and (owner or "") == self.writer.owner
        return "ok" if mine and status == JobStatus.RUNNING else "superseded"

    def supersede(self) -> None:
        """The attempt is no longer this worker's: stop the job function (and its model
        call); the worker then writes nothing more."""
        self.superseded = True
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def close(self) -> None:
        """Stop the flush timer; pending updates are flushed by the caller first."""
        if self._timer is not None and not self._timer.done():
            self._timer.cancel()
            # gather, not a bare await + except: a cancel aimed at *us* must propagate.
            await asyncio.gather(self._timer, return_exceptions=True)
