"""The chaos run's verdict: every watcher's events and every job's stored end, checked
with the rules of ``invariants``, as a list of violations.

Watcher kinds: "job" (``GET /v1/jobs/{id}/events``), "resume" (the same endpoint, left
and resumed at random), "named" (``GET /v1/events?job=..``), "all" (``GET /v1/events``),
"poll" (``GET /v1/jobs/{id}``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .invariants import (
    CUT,
    GONE,
    TERMINAL,
    Ending,
    Received,
    WatchLog,
    apply,
    check_history,
    check_positions,
    differences,
    rebuild,
    said_lost,
    text_difference,
    well_formed,
)

PER_JOB_IDS = frozenset({"job", "resume"})  # streams whose ids are the job's seq
ENDING_KINDS = frozenset({"job", "resume", "named", "poll"})  # must stop by themselves


@dataclass(frozen=True)
class Outcome:
    """A job's end as stored: the final snapshot (None: GET answered 404), the model's
    full text for a ``generate`` job, and when the job ended."""

    job_id: str
    final: dict[str, Any] | None
    expected_output: str | None = None
    ended_at: float | None = None


@dataclass(frozen=True)
class Violation:
    rule: str
    watcher: str  # a watcher's name, or "store" / "stack"
    job: str
    detail: str
    count: int = 1


@dataclass
class Checked:
    violations: list[Violation]
    events: int  # events (and poll answers) checked
    superseded: int  # (watcher, job) views a later Redis loss made stale: Context.superseded


@dataclass
class Context:
    """What the checks share: the jobs' outcomes, when history was lost, the bounds."""

    outcomes: dict[str, Outcome]
    losses: list[tuple[float, float]]  # (from, to): writes acknowledged then may be gone
    hang_s: float
    margin_s: float = 2.0  # delivery after a write, clocks read in different processes
    ended_then_lost: set[str] = field(default_factory=set)  # filled by check_run

    def superseded(self, last: Received, outcome: Outcome) -> bool:
        """Did a view that stopped at an end (``last``: a terminal event, or a polled
        snapshot of an ended job) see writes that a Redis loss after them took back?

        Restarting Redis from an older snapshot (or empty) takes back writes already
        delivered: a job a watcher saw end may run again to another end, or be gone. A
        watcher that had stopped at that end, as it should, cannot know; such views are
        counted, not flagged. (The all-jobs stream is still connected: it must follow.)
        """
        status = last.data.get("status") if last.kind == "poll" else last.kind
        if status not in TERMINAL:
            return False
        for lost_from, lost_to in self.losses:
            if lost_from - self.margin_s <= last.at <= lost_to + self.margin_s:
                ended = (outcome.final or {}).get("finished_at") or 0
                if outcome.final is None or ended > lost_to:
                    return True
        return False


class _Findings:
    def __init__(self) -> None:
        self.raw: list[Violation] = []
        self.superseded = 0

    def add(self, rule: str, watcher: str, job: str, detail: str) -> None:
        self.raw.append(Violation(rule, watcher, job, detail))

    def aggregated(self) -> list[Violation]:
        """One line per (rule, watcher, job): the first detail and how often it happened."""
        counts = Counter((v.rule, v.watcher, v.job) for v in self.raw)
        first: dict[tuple[str, str, str], Violation] = {}
        for v in self.raw:
            first.setdefault((v.rule, v.watcher, v.job), v)
        return [
            Violation(v.rule, v.watcher, v.job, v.detail, counts[key]) for key, v in first.items()
        ]


def check_run(logs: list[WatchLog], ctx: Context, extra: Iterable[Violation] = ()) -> Checked:
    """Every invariant for every job and watcher; ``extra``: violations found elsewhere."""
    out = _Findings()
    out.raw += extra
    ctx.ended_then_lost = _ended_then_lost(logs, ctx)
    events = 0
    for outcome in ctx.outcomes.values():
        _check_store(outcome, ctx, out)
    for log in logs:
        events += _check_watcher(log, ctx, out)
    return Checked(out.aggregated(), events, out.superseded)


def _ended_then_lost(logs: list[WatchLog], ctx: Context) -> set[str]:
    """Jobs gone at the end that some watcher saw end before a Redis loss took them:
    a watcher that was away at that moment can only be told 404 (see ``superseded``)."""
    found = set()
    for log in logs:
        last_of: dict[str, Received] = {}
        for ev in log.events:  # a poller's events are all of its one job
            last_of[log.jobs[0] if log.kind == "poll" else str(ev.data.get("job_id"))] = ev
        for job, last in last_of.items():
            outcome = ctx.outcomes.get(job)
            if outcome is not None and outcome.final is None and ctx.superseded(last, outcome):
                found.add(outcome.job_id)
    return found


def _check_store(outcome: Outcome, ctx: Context, out: _Findings) -> None:
    job, final = outcome.job_id, outcome.final
    if final is None:
        if not ctx.losses:
            out.add("job_vanished", "store", job, "GET answers 404 and Redis never lost data")
        return
    if final.get("status") not in TERMINAL:
        out.add("job_unfinished", "store", job, f"still {final.get('status')} at the end")
    elif final["status"] == "completed" and outcome.expected_output is not None:
        if final.get("output") != outcome.expected_output:
            got = text_difference(outcome.expected_output, str(final.get("output")))
            out.add("output_not_model_text", "store", job, f"model's text vs stored {got}")


def _check_watcher(log: WatchLog, ctx: Context, out: _Findings) -> int:
    if log.kind == "poll":
        _check_poller(log, ctx, out)
        _check_end_time(log, ctx, out)
        return len(log.events)
    good = []
    for ev in log.events:
        if well_formed(ev.data):
            good.append(ev)
        else:
            out.add("bad_data", log.name, str(ev.data.get("job_id", "")), f"{ev.kind}: {ev.data}")
    for rule, detail in check_positions(good, log.kind in PER_JOB_IDS):
        out.add(rule, log.name, "", detail)
    for job in log.jobs:
        _check_job(log, [e for e in good if e.data["job_id"] == job], ctx.outcomes[job], ctx, out)
    _check_endings(log, good, ctx, out)
    _check_end_time(log, ctx, out)
    return len(log.events)


def _check_job(
    log: WatchLog, events: list[Received], outcome: Outcome, ctx: Context, out: _Findings
) -> None:
    job = outcome.job_id
    if not events:
        lost = outcome.final is None or any(ctx.outcomes[j].final is None for j in log.jobs)
        if lost and any(e.how == GONE for e in log.endings):
            # It asked only once the job (or another job it named) was gone, and a 404
            # said so: the API names unknown jobs, it does not stream half a set.
            return
        out.add("never_seen", log.name, job, "no event of this job arrived")
        return
    found, last_terminal, terminals = check_history(events)
    for rule, detail in found:
        out.add(rule, log.name, job, detail)
    _check_completed_text(log, events, outcome, out)
    if outcome.final is None:
        gone = any(e.how == GONE for e in log.endings)
        compared = _check_lost(last_terminal, events[-1], outcome, ctx, gone)
        rule = "lost_without_state_lost"
    else:
        compared, rule = _check_state(log, events, outcome, ctx), "state_mismatch"
    if compared is None:
        out.superseded += 1
        return
    if compared:
        out.add(rule, log.name, job, compared)
    if terminals != 1:
        out.add("terminal_count", log.name, job, f"{terminals} terminal events at the end")


def _check_completed_text(
    log: WatchLog, events: list[Received], outcome: Outcome, out: _Findings
) -> None:
    """Whenever a watcher saw the job complete, its text was the model's, whatever Redis
    lost later (a loss may take the end back, never make a wrong text right): this
    holds for jobs whose final state a later loss erased too."""
    if outcome.expected_output is None:
        return
    job: dict[str, Any] | None = None
    for ev in events:
        job = apply(job, ev.kind, ev.data)
        if ev.kind == "completed" and job.get("output") != outcome.expected_output:
            got = text_difference(outcome.expected_output, str(job.get("output") or ""))
            out.add("completed_with_other_text", log.name, outcome.job_id, f"model's vs {got}")
            return


def _check_lost(
    terminal: Received | None, last: Received, outcome: Outcome, ctx: Context, gone: bool
) -> str | None:
    """GET says 404: the watcher must have been told (``state_lost``), unless it stopped
    at an end that a Redis loss took back, or was away (and then told 404) while that
    happened (None: there is nothing to compare)."""
    if terminal is not None and said_lost(terminal.data, terminal.kind):
        return ""
    if ctx.superseded(last, outcome) or (gone and outcome.job_id in ctx.ended_then_lost):
        return None
    return f"GET is 404; it saw {'no terminal event' if terminal is None else terminal.kind}"


def _check_state(
    log: WatchLog, events: list[Received], outcome: Outcome, ctx: Context
) -> str | None:
    """The rebuilt job against the stored one: the differences ("" when none), or None
    for a watcher that stopped at an end a later Redis loss took back."""
    assert outcome.final is not None
    diff = "; ".join(differences(rebuild(events) or {}, outcome.final))
    stale = log.kind != "all" and ctx.superseded(events[-1], outcome)
    return None if diff and stale else diff


def _check_poller(log: WatchLog, ctx: Context, out: _Findings) -> None:
    job = log.jobs[0]
    outcome = ctx.outcomes[job]
    if not log.events:
        out.add("never_seen", log.name, job, "no answer to any poll")
        return
    for answer in log.events:
        snap = answer.data
        if snap.get("status") == "completed" and outcome.expected_output is not None:
            if snap.get("output") != outcome.expected_output:
                got = text_difference(outcome.expected_output, str(snap.get("output") or ""))
                out.add("completed_with_other_text", log.name, job, f"model's vs {got}")
                break
    last = log.events[-1]
    if outcome.final is None:
        if last.kind == "gone" or said_lost(last.data, last.data.get("status", "")):
            return
        if ctx.superseded(last, outcome):
            out.superseded += 1
        else:
            out.add("poll_mismatch", log.name, job, f"GET is 404; it last saw {last.kind}")
        return
    diff = ["job gone (404)"] if last.kind == "gone" else differences(last.data, outcome.final)
    if diff and ctx.superseded(last, outcome):
        out.superseded += 1
    elif diff:
        out.add("poll_mismatch", log.name, job, "; ".join(diff))


def _check_endings(log: WatchLog, events: list[Received], ctx: Context, out: _Findings) -> None:
    """How connections ended: a per-job or named stream only right after a terminal
    event (named: once all its jobs ended); the all-jobs stream never by itself."""
    for ending in log.endings:
        where = f"connection {ending.conn}: {ending.how}"
        if ending.how == CUT or ending.how.startswith("error"):
            continue  # the client left, or the API went away: it reconnects
        if ending.how.startswith("http"):
            if not ending.how.startswith(("http 5", "http 429")):
                out.add("http_error", log.name, "", where)
        elif log.kind == "all":
            out.add("all_jobs_stream_ended", log.name, "", where)
        elif ending.how == GONE:
            if all(ctx.outcomes[j].final is not None for j in log.jobs):
                out.add("unexpected_404", log.name, "", f"{where}, yet the job(s) exist at the end")
        else:
            _check_stream_end(log, ending, [e for e in events if e.conn <= ending.conn], out)


def _check_stream_end(
    log: WatchLog, ending: Ending, before: list[Received], out: _Findings
) -> None:
    """A stream closed by the server (or a 204 on resume) right after a terminal event.

    A resume past the end may also get a stream that closes at once, with no event
    (the named stream may answer either way): then the last event before counts.
    """
    last = before[-1] if before else None
    where = f"connection {ending.conn}: {ending.how} after"
    if last is None or last.kind not in TERMINAL:
        kind = last.kind if last else "nothing"
        out.add("ended_without_terminal", log.name, "", f"{where} {kind}")
        return
    if log.kind == "named":
        ended = {e.data["job_id"] for e in before if e.kind in TERMINAL}
        missing = [j for j in log.jobs if j not in ended]
        if missing:
            out.add("ended_early", log.name, "", f"{where} {len(missing)} job(s) still running")


def _check_end_time(log: WatchLog, ctx: Context, out: _Findings) -> None:
    """No watcher hangs: it stops by itself within ``hang_s`` of its jobs' end."""
    if log.kind not in ENDING_KINDS:
        return
    job = log.jobs[0] if len(log.jobs) == 1 else ""
    if log.done_at is None:
        out.add("hung", log.name, job, "still open when the run ended")
        return
    # A job's end: as stored, or the later end this watcher was sent (a loss took the
    # first end back and the job ran again: the watcher rightly followed it).
    told = {e.data.get("job_id"): e.at for e in log.events if e.kind in TERMINAL}
    ends = [_later(ctx.outcomes[j].ended_at, told.get(j)) for j in log.jobs]
    if None in ends:
        return
    lag = log.done_at - max(e for e in ends if e is not None)
    if lag > ctx.hang_s:
        out.add("slow_end", log.name, job, f"stopped {lag:.1f} s after its job(s) ended")


def _later(a: float | None, b: float | None) -> float | None:
    return a if b is None else b if a is None else max(a, b)
