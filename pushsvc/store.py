"""Job state in Redis: the atomic publish path (Lua), snapshots, listing and event logs."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio import Redis

from .errors import BadRequest
from .events import Frame
from .keys import Keys
from .models import JobSnapshot, JobStatus
from .queue import Enqueue
from .settings import Settings

# Hash fields kept as raw strings (Lua reads or appends them); all others hold JSON.
RAW_FIELDS = frozenset({"status", "tenant", "arq_id", "cancel", "type", "priority"})
INT_FIELDS = frozenset({"seq", "attempt", "max_attempts", "run", "updated_at"})
SNAPSHOT_FIELDS = frozenset(JobSnapshot.model_fields)


def _lua(name: str) -> str:
    return (resources.files(__package__) / "lua" / name).read_text()


def encode_fields(fields: dict[str, Any]) -> list[str]:
    """Flatten ``fields`` into HSET arguments, JSON-encoding all but the raw and int fields."""
    flat: list[str] = []
    for name, value in fields.items():
        flat.append(name)
        if name in RAW_FIELDS or name in INT_FIELDS:
            flat.append(str(value))
        else:
            flat.append(json.dumps(value, separators=(",", ":")))
    return flat


def decode_fields(raw: dict[bytes, bytes], output: bytes | None) -> dict[str, Any]:
    out: dict[str, Any] = {"output": (output or b"").decode()}
    for key_b, value_b in raw.items():
        key, value = key_b.decode(), value_b.decode()
        if key in RAW_FIELDS:
            out[key] = value
        elif key in INT_FIELDS:
            out[key] = int(value)
        else:
            out[key] = json.loads(value)
    return out


@dataclass(frozen=True)
class Published:
    seq: int
    status: JobStatus
    cancel_requested: bool


@dataclass(frozen=True)
class Rejected:
    """A transition refused because the job was in another state."""

    status: JobStatus


@dataclass(frozen=True)
class Throttled:
    """A start refused because the tenant is at its running limit; it was re-queued."""


class JobStore:
    """Reads and writes job state; every write goes through one Lua publish path."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.namespace)
        fn = _lua("publish_fn.lua")
        self._publish = redis.register_script(fn + _lua("publish.lua"))
        self._create = redis.register_script(fn + _lua("create.lua"))
        self._read = redis.register_script(_lua("read.lua"))
        self.published = 0  # events this process published (a worker's metric)

    def _call(
        self,
        job_id: str,
        tenant: str,
        kind: str,
        data: dict[str, Any],
        fields: dict[str, Any] | None,
        opts: dict[str, Any],
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV in the order lua/publish_fn.lua documents."""
        k, s = self.keys, self.settings
        enq: Enqueue | None = opts.get("enqueue")
        keys = [
            k.job(job_id),
            k.job_log(job_id),
            k.tenant_log(tenant),
            k.tenant_seq(tenant),
            k.leases,
            enq.target if enq else k.leases,
            enq.key if enq else k.leases,
            k.job_output(job_id),
            k.tenant_running(tenant),
            k.stats,
        ]
        fields = dict(fields or {})
        reset_output = fields.pop("output", None) is not None
        # The script prepends '{"seq":N,' so stored and published JSON carry the seq.
        body = json.dumps({"job_id": job_id, "ts": time.time(), **data}, separators=(",", ":"))
        lease = opts.get("lease_until_ms")
        args: list[Any] = [
            s.job_ttl_s,
            s.job_log_cap,
            s.tenant_log_cap,
            kind,
            body[1:],
            ",".join(opts.get("expect", ())),
            opts.get("delta", ""),
            k.job_channel(job_id),
            k.tenant_channel(tenant),
            opts.get("arq_id") or "",
            "" if lease is None else int(lease),
            job_id,
            enq.payload if enq else "",
            enq.px if enq else 0,
            enq.score if enq else 0,
            enq.member if enq else "",
            opts.get("fingerprint", ""),
            opts.get("score", 0),
            "1" if reset_output else "",
            opts.get("max_running") or "",
            *encode_fields(fields),
        ]
        return keys, args

    async def create(
        self,
        tenant: str,
        fields: dict[str, Any],
        enqueue: Enqueue,
        idem: tuple[str, str] | None,
    ) -> tuple[str, str | None]:
        """Store a new job, publish its first event (a ``snapshot``) and enqueue it, at once.

        ``idem`` is (key, request fingerprint). Returns (job id, None) for a new job, or
        (earlier job id, its fingerprint) when the idempotency key was used before.
        """
        job_id = fields["id"]
        keys, args = self._call(
            job_id,
            tenant,
            "snapshot",
            to_snapshot(fields).model_dump(mode="json", exclude={"seq"}),
            fields,
            {
                "enqueue": enqueue,
                "fingerprint": idem[1] if idem else "",
                "score": int(fields["created_at"] * 1000),
            },
        )
        index = self.keys.tenant_index(tenant)
        keys += [index, idem[0] if idem else index]
        created, found = await self._create(keys=keys, args=args)
        if created:
            return job_id, None
        earlier, _, fingerprint = found.decode().partition(" ")
        return earlier, fingerprint

    async def publish(
        self,
        job_id: str,
        tenant: str,
        kind: str,
        data: dict[str, Any],
        fields: dict[str, Any] | None = None,
        *,
        expect: tuple[JobStatus, ...] = (),
        delta: str = "",
        arq_id: str | None = None,
        lease_until_ms: float | None = None,
        enqueue: Enqueue | None = None,
        max_running: int | None = None,
    ) -> Published | Rejected | Throttled | None:
        """Apply ``fields``, append ``delta`` and publish one event, atomically.

        Nothing happens unless the job's status is in ``expect`` (when given) and its
        current attempt is ``arq_id`` (when given). A ``lease_until_ms`` on a transition to
        running takes the lease; leaving running drops it; ``enqueue`` queues an attempt.
        With ``max_running``, a tenant already running that many jobs gets ``Throttled``
        and ``enqueue`` (the attempt's later slot) is stored instead of any change.
        Returns None for an unknown (or expired) job.
        """
        opts = {
            "expect": expect,
            "delta": delta,
            "arq_id": arq_id,
            "lease_until_ms": lease_until_ms,
            "enqueue": enqueue,
            "max_running": max_running,
        }
        keys, args = self._call(job_id, tenant, kind, data, fields, opts)
        reply = await self._publish(keys=keys, args=args)
        if reply[0] > 0:
            self.published += 1
        if reply[0] == -1:
            return None
        if reply[0] == -2:
            return Throttled()
        if reply[0] == 0:
            return Rejected(JobStatus(reply[1].decode()))
        return Published(int(reply[0]), JobStatus(reply[1].decode()), reply[2] == b"1")

    async def load(self, job_id: str) -> dict[str, Any] | None:
        """All stored fields of a job (payload, tenant and arq id included), or None."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.keys.job(job_id))
            pipe.get(self.keys.job_output(job_id))
            raw, output = await pipe.execute()
        return decode_fields(raw, output) if raw else None

    async def snapshot(self, job_id: str, tenant: str) -> JobSnapshot | None:
        """The tenant's job, or None when it is unknown or belongs to another tenant."""
        fields = await self.load(job_id)
        if fields is None or fields.get("tenant") != tenant:
            return None
        return to_snapshot(fields)

    async def list_jobs(
        self,
        tenant: str,
        *,
        limit: int,
        cursor: str | None = None,
        status: JobStatus | None = None,
        type_: str | None = None,
    ) -> tuple[list[JobSnapshot], str | None]:
        """The tenant's jobs, newest first, filtered; returns the page and the next cursor."""
        index = self.keys.tenant_index(tenant)
        after = None if cursor is None else _decode_cursor(cursor)
        # A fixed upper bound keeps offsets stable while newer jobs are being added.
        max_score = int(time.time() * 1000) + 1 if after is None else after[0]
        page: list[JobSnapshot] = []
        stale: list[str] = []
        offset, batch = 0, max(limit * 2, 50)
        try:
            while True:
                rows = await self.redis.zrevrangebyscore(
                    index, max_score, "-inf", start=offset, num=batch, withscores=True
                )
                if not rows:
                    return page, None
                offset += len(rows)
                for member, score_f in rows:
                    job_id, score = member.decode(), int(score_f)
                    # Equal scores come in reverse id order: skip those already served.
                    if after is not None and score == after[0] and job_id >= after[1]:
                        continue
                    fields = await self.load(job_id)
                    if fields is None:
                        stale.append(job_id)
                    elif _matches(fields, status, type_):
                        page.append(to_snapshot(fields))
                        if len(page) == limit:
                            return page, _encode_cursor(score, job_id)
        finally:
            if stale:  # expired jobs: prune the index lazily
                await self.redis.zrem(index, *stale)

    async def events_after(self, job_id: str, seq: int) -> list[Frame] | None:
        """The job's logged events with seq > ``seq``, or None when some are gone."""
        entries = await self.redis.xrange(self.keys.job_log(job_id), f"({_sid(seq)}", "+")
        current = await self._current_seq(job_id)
        if seq > current or (not entries and seq < current):
            return None  # an id from the future, or a log that expired while the job lives
        if entries and _seq_of(entries[0][0]) != seq + 1:
            return None
        return [
            Frame(int(f[b"t"]), _seq_of(eid), f[b"k"].decode(), job_id, f[b"d"].decode())
            for eid, f in entries
        ]

    async def tenant_events_after(self, tenant: str, tseq: int) -> list[Frame] | None:
        """The tenant's logged events with tenant seq > ``tseq``, or None when some are gone."""
        key = self.keys.tenant_log(tenant)
        entries = await self.redis.xrange(key, f"({_sid(tseq)}", "+")
        current = int(await self.redis.get(self.keys.tenant_seq(tenant)) or 0)
        if tseq > current or (not entries and tseq < current):
            return None
        if entries and _seq_of(entries[0][0]) != tseq + 1:
            return None
        return [
            Frame(_seq_of(eid), int(f[b"s"]), f[b"k"].decode(), f[b"j"].decode(), f[b"d"].decode())
            for eid, f in entries
        ]

    async def last_event(self, job_id: str) -> Frame | None:
        entries = await self.redis.xrevrange(self.keys.job_log(job_id), "+", "-", count=1)
        if not entries:
            return None
        eid, f = entries[0]
        return Frame(int(f[b"t"]), _seq_of(eid), f[b"k"].decode(), job_id, f[b"d"].decode())

    async def _current_seq(self, job_id: str) -> int:
        return int(await self.redis.hget(self.keys.job(job_id), "seq") or 0)  # type: ignore[misc]

    async def read_view(
        self, tenant: str, job_ids: list[str], recent: int
    ) -> tuple[int, dict[str, dict[str, Any] | None]]:
        """Atomically: the tenant seq and the named jobs (or the recent active ones)."""
        keys = [self.keys.tenant_seq(tenant), self.keys.tenant_index(tenant)]
        prefixes: list[str | int] = [self.keys.job(""), recent, self.keys.job_output("")]
        reply = await self._read(keys=keys, args=[*prefixes, *job_ids])
        view: dict[str, dict[str, Any] | None] = {}
        for i in range(1, len(reply), 3):
            flat = reply[i + 1]
            raw = dict(zip(flat[::2], flat[1::2], strict=True))
            view[reply[i].decode()] = decode_fields(raw, reply[i + 2]) if raw else None
        return int(reply[0]), view


def to_snapshot(fields: dict[str, Any]) -> JobSnapshot:
    return JobSnapshot.model_validate({k: v for k, v in fields.items() if k in SNAPSHOT_FIELDS})


def _matches(fields: dict[str, Any], status: JobStatus | None, type_: str | None) -> bool:
    return (status is None or fields["status"] == status) and (
        type_ is None or fields["type"] == type_
    )


def _encode_cursor(score: int, job_id: str) -> str:
    raw = json.dumps([score, job_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        score, job_id = json.loads(raw)
        if not isinstance(score, int) or not isinstance(job_id, str):
            raise ValueError(cursor)
    except (ValueError, TypeError) as exc:
        raise BadRequest("cursor is not one this API issued", code="bad_cursor") from exc
    return score, job_id


def _sid(seq: int) -> str:
    return f"0-{seq}"


def _seq_of(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[1])
