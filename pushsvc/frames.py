"""``Frame``: one event as published, and its SSE encoding.

Shared by the publish side (the store reads frames back from the logs) and the push
side (the bus routes them), so workers need not import the bus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .epoch import StreamPosition

# Kinds sent without an SSE ``id:``: computed per API process, never logged, never
# replayed (a client applies one when its seq is the one it holds; see line.py).
VOLATILE = frozenset({"queue"})


@dataclass(slots=True)
class Frame:
    """One event as published: both positions (tenant and job), the kind, the JSON text."""

    tseq: int
    seq: int
    kind: str
    job_id: str
    data: str
    epoch: str = ""  # the job's epoch (``seq`` counts in it)
    tepoch: str = ""  # the tenant's epoch (``tseq`` counts in it)
    first_seq: int = 0  # lowest job seq this frame covers (merged frames cover several)
    _by_seq: bytes | None = field(default=None, repr=False)
    _by_tseq: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.first_seq:
            self.first_seq = self.seq

    @classmethod
    def parse(cls, raw: bytes) -> Frame:
        """``"<tseq>.<tenant epoch> <seq>.<epoch> <kind> <job id> <json>"``."""
        tpos, pos, kind, job_id, data = raw.decode().split(" ", 4)
        tseq, _, tepoch = tpos.partition(".")
        seq, _, epoch = pos.partition(".")
        return cls(int(tseq), int(seq), kind, job_id, data, epoch, tepoch)

    @property
    def position(self) -> StreamPosition:
        return StreamPosition(self.seq, self.epoch)

    @property
    def tenant_position(self) -> StreamPosition:
        return StreamPosition(self.tseq, self.tepoch)

    def sse(self, by_tseq: bool) -> bytes:
        """The SSE frame, ``id:`` being the job's or the tenant's position; encoded once."""
        if self.kind in VOLATILE:
            if self._by_seq is None:
                self._by_seq = _encode(None, self.kind, self.data)
            return self._by_seq
        if by_tseq:
            if self._by_tseq is None:
                self._by_tseq = _encode(self.tenant_position, self.kind, self.data)
            return self._by_tseq
        if self._by_seq is None:
            self._by_seq = _encode(self.position, self.kind, self.data)
        return self._by_seq

    def merge(self, newer: Frame) -> Frame:
        """Coalesce two frames of one job and kind: latest progress wins, output joins."""
        data = newer.data
        if self.kind == "output":
            merged = json.loads(newer.data)
            merged["delta"] = json.loads(self.data)["delta"] + merged["delta"]
            data = json.dumps(merged, separators=(",", ":"))
        return Frame(
            newer.tseq,
            newer.seq,
            self.kind,
            self.job_id,
            data,
            newer.epoch,
            newer.tepoch,
            self.first_seq,
        )


# Encoded by hand rather than with sse-starlette's ServerSentEvent: a frame is encoded
# once and the bytes are shared by every stream that sends it.
def _encode(event_id: StreamPosition | None, kind: str, data: str) -> bytes:
    if event_id is None:  # EventSource keeps the last id it had: a resume is unchanged
        return f"event: {kind}\ndata: {data}\n\n".encode()
    return f"id: {event_id}\nevent: {kind}\ndata: {data}\n\n".encode()
