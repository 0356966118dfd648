"""The chaos run's invariants for one watcher's events: what it recorded, how it rebuilds
a job, and the rules its events keep. Pure functions (no I/O), written against the v1
contract (docs/contract.md: events, guarantees 1-9) rather than against how the server does it.

How a watcher rebuilds a job, as any generic SSE client would: a ``snapshot`` replaces
the whole job; an ``output`` event's ``delta`` appends to ``output``; every other event
sets the fields its data carries (a terminal event also sets ``status`` to its kind).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

TERMINAL = frozenset({"completed", "failed", "cancelled"})
META = frozenset({"job_id", "seq", "ts", "reset"})
# What the rebuilt job must share with the stored one. Not progress, stage, message or
# eta_s: a terminal event does not carry them (completed sets progress to 100 in the
# store only), so a generic client cannot know them.
COMPARED = ("status", "attempt", "output", "result", "error")
STATE_LOST = "state_lost"  # the error code of a job lost together with Redis

# How one connection of a watcher ended.
CLOSED = "closed"  # the server ended the response
NO_CONTENT = "204"  # a resume answered "nothing more will come"
GONE = "404"  # the job (or one of the named jobs) is unknown
CUT = "cut"  # the watcher left by itself (the resuming client)


@dataclass(frozen=True)
class Received:
    """One event as a watcher got it. ``id`` is the SSE id exactly as sent; a poller
    records each answer as kind ``poll`` (the snapshot) or ``gone`` (a 404)."""

    conn: int  # which of the watcher's connections (0, 1, ...)
    id: str
    kind: str
    data: dict[str, Any]
    at: float = 0.0  # receive time, epoch seconds


@dataclass(frozen=True)
class Ending:
    conn: int
    how: str  # CLOSED, NO_CONTENT, GONE, CUT, "http <status>" or "error: <exception>"
    at: float = 0.0


@dataclass
class WatchLog:
    """Everything one watcher saw, in arrival order, and how each connection ended."""

    name: str
    kind: str
    jobs: list[str]  # the jobs it watches (for "all": the tenant's jobs, added as submitted)
    events: list[Received] = field(default_factory=list)
    endings: list[Ending] = field(default_factory=list)
    done_at: float | None = None  # when it stopped by itself (None: it never did)


# -- one event at a time --------------------------------------------------------------


def parse_id(raw: str) -> tuple[int, str] | None:
    """``"17.a1b2c3d4"`` -> (17, "a1b2c3d4"); a plain ``"17"`` (older servers) -> (17, "")."""
    seq, _, epoch = raw.partition(".")
    if not seq.isdigit() or (epoch and not epoch.isalnum()) or raw.endswith("."):
        return None
    return int(seq), epoch


def well_formed(data: dict[str, Any]) -> bool:
    """The contract: ``data`` always holds ``job_id``, ``seq`` (an int) and ``ts``."""
    seq, ts = data.get("seq"), data.get("ts")
    return (
        isinstance(data.get("job_id"), str)
        and isinstance(seq, int)
        and not isinstance(seq, bool)
        and isinstance(ts, int | float)
    )


def apply(job: dict[str, Any] | None, kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """The job after one event, as a client that knows only the contract rebuilds it."""
    fields = {k: v for k, v in data.items() if k not in META}
    if kind == "snapshot":
        return {**fields, "id": data["job_id"], "seq": data["seq"]}
    after = {**(job or {}), "seq": data["seq"]}
    if kind == "output":
        after["output"] = (after.get("output") or "") + str(data.get("delta", ""))
        return after
    if kind in TERMINAL:
        after["status"] = kind
    after.update(fields)
    return after


def rebuild(events: Iterable[Received]) -> dict[str, Any] | None:
    job: dict[str, Any] | None = None
    for ev in events:
        job = apply(job, ev.kind, ev.data)
    return job


# -- one job on one watcher -----------------------------------------------------------


class _History:
    """Guarantees 1-5 and 8 for one job's events on one watcher (across its connections):
    a snapshot first; then each seq once and in order; a snapshot that goes back must be
    marked ``reset`` (history lost: the client replaces its state, and terminal events
    before it no longer count); nothing after a terminal event but a snapshot."""

    def __init__(self) -> None:
        self.seq: int | None = None
        self.prev = ""
        self.terminals = 0  # in the current segment (since the last accepted snapshot)
        self.last_terminal: Received | None = None
        self.found: list[tuple[str, str]] = []

    def see(self, ev: Received) -> None:
        seq = ev.data["seq"]
        if ev.kind == "snapshot":
            self._snapshot(ev, seq)
        else:
            self._event(ev, seq)
        self.seq, self.prev = seq, ev.kind

    def _snapshot(self, ev: Received, seq: int) -> None:
        if ev.data.get("reset") is not True and self.seq is not None and seq <= self.seq:
            self.found.append(("unmarked_rewind", f"snapshot seq {seq} after {self.seq}"))
        self.terminals, self.last_terminal = 0, None

    def _event(self, ev: Received, seq: int) -> None:
        where = f"{ev.kind} seq {seq} after {self.seq} (id {ev.id})"
        if self.seq is None:
            self.found.append(("no_snapshot_first", where))
        elif ev.kind in TERMINAL and self.prev == "snapshot" and seq == self.seq:
            pass  # a late joiner: the ended job's snapshot, then its terminal event
        elif seq <= self.seq:
            self.found.append(("duplicate", where))
        elif seq > self.seq + 1:
            self.found.append(("gap", f"{where}: {seq - self.seq - 1} missing"))
        if self.terminals and ev.kind not in TERMINAL:
            self.found.append(("event_after_terminal", where))
        if ev.kind in TERMINAL:
            self.terminals += 1
            self.last_terminal = ev


def check_history(events: list[Received]) -> tuple[list[tuple[str, str]], Received | None, int]:
    """(rule, detail) found in one job's events on one watcher, that watcher's last
    terminal event, and how many terminal events the last segment holds."""
    history = _History()
    for ev in events:
        history.see(ev)
    return history.found, history.last_terminal, history.terminals


def check_positions(events: list[Received], per_job_ids: bool) -> Iterator[tuple[str, str]]:
    """The watcher's ``id:``s as a resume position: never back to an epoch it left (after
    a reset, the old epoch's positions mean nothing), a new epoch opened by a snapshot
    (or by a ``state_lost`` end),
    and within one epoch never going back, except at a ``reset`` snapshot: a store
    rewound to an older copy of the same history (not yet written since) is the truth
    until the next write starts a new epoch."""
    left: set[str] = set()
    epoch, last = None, None  # the current epoch ("": plain ids) and its last position
    for ev in events:
        pos = parse_id(ev.id)
        if pos is None:
            yield "bad_id", f"{ev.kind} with id {ev.id!r}"
            continue
        seq, ep = pos
        where = f"{ev.kind} id {ev.id} after {last}.{epoch}" if epoch else f"{ev.kind} id {ev.id}"
        if per_job_ids and seq != ev.data["seq"]:
            yield "id_seq_mismatch", f"{ev.kind} id {ev.id} carries seq {ev.data['seq']}"
        if ep in left:
            yield "old_epoch_after_reset", where
            continue
        if epoch is not None and ep != epoch:
            # A new history opens with what replaces a job's state: a snapshot, or the
            # end of a job of which the store kept nothing (``state_lost``).
            if ep and epoch and ev.kind != "snapshot" and not said_lost(ev.data, ev.kind):
                yield "epoch_change_without_snapshot", where
            if epoch:  # plain ids name no history, so none to leave
                left.add(epoch)
            last = None
        reset = ev.kind == "snapshot" and ev.data.get("reset") is True
        if last is not None and seq < last and not reset:
            yield "id_went_back", where
        epoch, last = ep, seq


def said_lost(data: dict[str, Any], kind: str = "failed") -> bool:
    """A ``failed`` event (or snapshot) saying the job was lost together with Redis."""
    error = data.get("error") or {}
    return kind == "failed" and isinstance(error, dict) and error.get("code") == STATE_LOST


def differences(seen: dict[str, Any], final: dict[str, Any]) -> list[str]:
    """The COMPARED fields in which ``seen`` differs from ``final``, described briefly."""
    out = []
    for name in COMPARED:
        if name == "output":
            text, stored = str(seen.get(name) or ""), str(final.get(name) or "")
            if text != stored:
                out.append(text_difference(text, stored))
        elif seen.get(name) != final.get(name):
            out.append(f"{name}: {_short(seen.get(name))} vs {_short(final.get(name))} stored")
    return out


def text_difference(text: str, stored: str) -> str:
    """Where two texts part: their lengths and the first differing character."""
    at = next((i for i, (a, b) in enumerate(zip(text, stored, strict=False)) if a != b), None)
    at = min(len(text), len(stored)) if at is None else at
    return f"output: {len(text)} chars vs {len(stored)} stored, first difference at {at}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
