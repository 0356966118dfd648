"""One call of the publish scripts (lua/publish_fn.lua): who writes (``Writer``), the
KEYS and ARGV it lays out (``PublishCall``), and what the script answers (``Reply``)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

from .epoch import StreamPosition, new_epoch
from .fields import encode_fields
from .keys import Keys
from .models import JobStatus
from .queue import Enqueue
from .settings import Settings


@dataclass(frozen=True)
class Published:
    seq: int
    status: JobStatus
    cancel_requested: bool
    epoch: str = ""

    @property
    def position(self) -> StreamPosition:
        return StreamPosition(self.seq, self.epoch)


@dataclass(frozen=True)
class Rejected:
    """A transition refused because the job was in another state (or attempt, or owner)."""

    status: JobStatus


@dataclass(frozen=True)
class Throttled:
    """A start refused because the tenant is at its running limit; it was re-queued."""


@dataclass(frozen=True)
class Diverged:
    """A worker's write refused: the stored job is not the history the worker wrote
    (another epoch, or fewer events): Redis lost or rewound it. The worker repairs."""

    status: JobStatus
    position: StreamPosition


Reply = Published | Rejected | Throttled | Diverged | None


@dataclass(frozen=True)
class Writer:
    """A running attempt as a writer: its arq id, the worker run that owns it, the last
    position it published (``known``), which the store must still hold, and the token
    of this call (``call``: sent again unchanged after a lost reply, it is not made
    twice; '' for none)."""

    arq_id: str
    owner: str = ""
    known: StreamPosition | None = None
    call: str = ""


@dataclass(frozen=True)
class Event:
    """A second event in one publish call, after the call's own: a worker's flush sends
    its progress and the text written since as one call (one round trip)."""

    kind: str
    data: dict[str, Any]
    delta: str = ""  # appended to the output


@dataclass(frozen=True)
class PublishCall:
    """One call of the publish scripts: what to change and under which conditions.

    ``layout`` turns it into the KEYS and ARGV that lua/publish_fn.lua names.
    """

    job_id: str
    tenant: str
    kind: str
    data: dict[str, Any]
    fields: dict[str, Any] = dc_field(default_factory=dict)
    expect: tuple[JobStatus, ...] = ()  # refused unless the job is in one of these
    delta: str = ""  # appended to the output
    writer: Writer | None = None  # refused unless the job is still this attempt's
    enqueue: Enqueue | None = None  # the attempt the change queues: to the outbox
    max_running: int | None = None  # a start refused at the tenant's running limit
    fingerprint: str = ""  # create: the idempotency fingerprint
    index_score: int = 0  # create and repair: the job's place in the tenant index
    then: Event | None = None  # a second event, published after this one

    def layout(
        self, keys: Keys, settings: Settings, run_id: str | bytes = ""
    ) -> tuple[list[str], list[Any]]:
        """The KEYS and ARGV of one call, in the order lua/publish_fn.lua names them;
        ``run_id``: the run id of the Redis the call reaches (``epoch.run_id_arg``)."""
        return self._keys(keys), self._args(keys, settings, run_id)

    def _keys(self, keys: Keys) -> list[str]:
        tenant = self.tenant
        return [
            keys.job(tenant, self.job_id),
            keys.job_log(tenant, self.job_id),
            keys.tenant_log(tenant),
            keys.tenant_position(tenant),
            keys.job_output(tenant, self.job_id),
            keys.tenant_running(tenant),
            keys.tenant_stats(tenant),
            keys.tenant_epoch(tenant),
            keys.outbox(tenant),
        ]

    def _body(self, data: dict[str, Any]) -> str:
        """An event's JSON without its opening brace: the script prepends '{"seq":N,', so
        stored and published JSON carry the seq."""
        body = json.dumps({"job_id": self.job_id, "ts": time.time(), **data}, separators=(",", ":"))
        return body[1:]

    def _args(self, keys: Keys, settings: Settings, run_id: str | bytes) -> list[Any]:
        enq, writer, then = self.enqueue, self.writer, self.then
        fields = dict(self.fields)
        reset_output = fields.pop("output", None) is not None
        known = writer.known if writer else None
        return [
            settings.job_ttl_s,
            settings.job_log_cap,
            settings.tenant_log_cap,
            self.kind,
            self._body(self.data),
            ",".join(self.expect),
            self.delta,
            keys.job_channel(self.tenant, self.job_id),
            keys.tenant_channel(self.tenant),
            writer.arq_id if writer else "",
            self.job_id,
            enq.arq_id if enq else "",
            enq.defer_ms if enq else 0,
            self.fingerprint,
            self.index_score,
            "1" if reset_output else "",
            self.max_running or "",
            writer.owner if writer else "",
            known.epoch if known else "",
            new_epoch(),
            known.seq if known else 0,
            then.kind if then else "",
            self._body(then.data) if then else "",
            then.delta if then else "",
            run_id,
            writer.call if writer else "",
            *encode_fields(fields),
        ]
