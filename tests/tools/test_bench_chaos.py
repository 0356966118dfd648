"""``pushsvc bench chaos``: the checks on hand-made event lists, the command's exit codes,
and one short real run with one fault of each cheap kind."""

from __future__ import annotations

import json
import re
import shutil
from typing import Any

import pytest
from rich.console import Console

from pushsvc.tools.bench import chaos
from pushsvc.tools.bench.chaos import Plan, model_text, run_chaos
from pushsvc.tools.bench.check import Context, Outcome, check_run
from pushsvc.tools.bench.command import bench_command
from pushsvc.tools.bench.invariants import (
    CLOSED,
    CUT,
    GONE,
    Ending,
    Received,
    WatchLog,
    check_history,
    check_positions,
    rebuild,
)

JOB = "0f6f1b7e-1111-4222-8333-444455556666"
E1, E2 = "a1b2c3d4", "e5f6a7b8"


def ev(seq: int, kind: str, epoch: str = E1, conn: int = 0, **data: Any) -> Received:
    """An event of JOB on a per-job stream: ``id:`` is ``<seq>.<epoch>``."""
    event_id = f"{seq}.{epoch}" if epoch else str(seq)
    return Received(conn, event_id, kind, {"job_id": JOB, "seq": seq, "ts": 1.0, **data}, seq)


SNAPSHOT: dict[str, Any] = dict(status="queued", attempt=1, output="", result=None, error=None)
FINAL: dict[str, Any] = {**SNAPSHOT, "id": JOB, "status": "completed", "output": "Hello world"}


def correct() -> list[Received]:
    return [
        ev(1, "snapshot", **SNAPSHOT),
        ev(2, "status", status="running", attempt=1),
        ev(3, "output", delta="Hello"),
        ev(4, "progress", progress=50.0, stage="generating", message=None, eta_s=1.0),
        ev(5, "output", delta=" world"),
        ev(6, "completed", result=None),
    ]


def verdict(events: list[Received], endings: list[Ending] | None = None) -> list[str]:
    """The rules a per-job stream that saw ``events`` broke (its job ended as FINAL)."""
    last = events[-1].conn if events else 0
    log = WatchLog("job x", "job", [JOB], events, endings or [Ending(last, CLOSED, 7)], 7.0)
    outcome = Outcome(JOB, FINAL, "Hello world", ended_at=6.5)
    checked = check_run([log], Context({JOB: outcome}, [], hang_s=20))
    return sorted(v.rule for v in checked.violations)


def test_a_correct_sequence_passes() -> None:
    events = correct()
    found, last, terminals = check_history(events)
    assert found == [] and terminals == 1 and last is events[-1]
    assert list(check_positions(events, per_job_ids=True)) == []
    assert {k: rebuild(events)[k] for k in FINAL} == FINAL  # type: ignore[index]
    assert rebuild(events)["seq"] == 6  # type: ignore[index]
    assert verdict(events) == []


def test_a_resume_on_another_connection_passes() -> None:
    events = correct()
    resumed = events[:3] + [Received(1, e.id, e.kind, e.data, e.at) for e in events[3:]]
    assert verdict(resumed, [Ending(0, CUT, 3.5), Ending(1, CLOSED, 7)]) == []


def test_a_late_joiner_gets_the_snapshot_then_the_terminal_event() -> None:
    late = [ev(6, "snapshot", **{k: v for k, v in FINAL.items() if k != "id"})]
    late.append(ev(6, "completed", result=None))
    assert verdict(late) == []


def test_a_duplicate_delta_is_flagged() -> None:
    events = correct()
    events.insert(3, ev(3, "output", delta="Hello"))  # the same event again, after a resume
    found, _, _ = check_history(events)
    assert [rule for rule, _ in found] == ["duplicate"]
    assert rebuild(events)["output"] == "HelloHello world"  # type: ignore[index]
    assert verdict(events) == ["completed_with_other_text", "duplicate", "state_mismatch"]


def test_a_missing_terminal_event_is_flagged() -> None:
    events = correct()[:-1]  # the stream ended after the last delta
    _, last, terminals = check_history(events)
    assert last is None and terminals == 0
    assert verdict(events) == ["ended_without_terminal", "state_mismatch", "terminal_count"]


def test_an_old_epoch_event_after_a_reset_is_flagged() -> None:
    """Redis came back from an older snapshot: the reset snapshot opens epoch E2 at seq 3;
    a stale event of E1 after it must not be applied as if it followed."""
    events = correct()[:4]
    events.append(ev(3, "snapshot", E2, reset=True, **{**SNAPSHOT, "status": "running"}))
    events.append(ev(5, "output", E1, delta=" world"))
    rules = [rule for rule, _ in check_positions(events, per_job_ids=True)]
    assert rules == ["old_epoch_after_reset"]
    assert [rule for rule, _ in check_history(events)[0]] == ["gap"]


def test_a_new_epoch_without_a_snapshot_is_flagged() -> None:
    events = correct()[:3] + [ev(1, "output", E2, delta="again")]
    rules = [rule for rule, _ in check_positions(events, per_job_ids=True)]
    assert rules == ["epoch_change_without_snapshot"]
    # A job of which the store kept nothing has no snapshot to show: its end opens it.
    lost = {"code": "state_lost", "message": "lost with Redis", "retryable": False}
    ended = correct()[:3] + [ev(4, "failed", E2, error=lost)]
    assert list(check_positions(ended, per_job_ids=True)) == []
    other = correct()[:3] + [ev(4, "failed", E2, error={**lost, "code": "upstream_error"})]
    rules = [rule for rule, _ in check_positions(other, per_job_ids=True)]
    assert rules == ["epoch_change_without_snapshot"]


def test_event_data_without_job_id_seq_and_ts_is_flagged() -> None:
    events = correct()
    events[2] = Received(0, f"3.{E1}", "output", {"job_id": JOB, "seq": "3", "delta": "Hello"})
    assert "bad_data" in verdict(events)


def test_a_completed_job_with_other_text_is_flagged_even_once_redis_lost_it() -> None:
    """A loss may take an end back; it never makes a wrong text right."""
    short = correct()[:3] + [ev(4, "completed", result=None)]  # " world" never came
    ctx = Context({JOB: Outcome(JOB, None, "Hello world", ended_at=4.5)}, [(0.0, 9.0)], 20)
    log = WatchLog("job x", "job", [JOB], short, [Ending(0, CLOSED, 5)], 5.0)
    assert [v.rule for v in check_run([log], ctx).violations] == ["completed_with_other_text"]
    poll = Received(0, "", "poll", {**FINAL, "output": "Hello"}, 4.0)
    poller = WatchLog("poll x", "poll", [JOB], [poll], [], 5.0)
    assert [v.rule for v in check_run([poller], ctx).violations] == ["completed_with_other_text"]
    log.events = correct()
    assert check_run([log], ctx).violations == []


def test_a_job_lost_with_redis_ends_with_state_lost() -> None:
    lost = {"code": "state_lost", "message": "lost with Redis", "retryable": False}
    events = correct()[:3] + [ev(4, "failed", error=lost, result=None)]
    log = WatchLog("job x", "job", [JOB], events, [Ending(0, CLOSED, 5)], 5.0)
    ctx = Context({JOB: Outcome(JOB, None, ended_at=4.5)}, [(0.0, 3.5)], hang_s=20)
    assert check_run([log], ctx).violations == []
    silent = WatchLog("job y", "job", [JOB], correct()[:3], [Ending(0, "error: X", 5)], None)
    rules = sorted(v.rule for v in check_run([silent], ctx).violations)
    assert rules == ["hung", "lost_without_state_lost", "terminal_count"]


def test_a_view_that_a_later_redis_loss_took_back_is_counted_not_flagged() -> None:
    """The stream ended at a completion that an older RDB snapshot then undid; the job
    ran again (attempt 2) and completed later."""
    log = WatchLog("job x", "job", [JOB], correct(), [Ending(0, CLOSED, 7)], 7.0)
    final = {**FINAL, "attempt": 2, "finished_at": 30.0}
    ctx = Context({JOB: Outcome(JOB, final, ended_at=30.0)}, [(4.0, 10.0)], hang_s=20)
    checked = check_run([log], ctx)
    assert checked.violations == [] and checked.superseded == 1


def test_a_client_away_while_redis_lost_an_ended_job_may_be_told_404() -> None:
    """The job completed, Redis came back empty, and then the resuming client, which
    had left just before the end, reconnected: a 404 is all that can be said."""
    seen_end = WatchLog("job x", "job", [JOB], correct(), [Ending(0, CLOSED, 7)], 7.0)
    away = WatchLog("resume x", "resume", [JOB], correct()[:5], [], 9.0)
    away.endings += [Ending(0, CUT, 5.5), Ending(1, GONE, 9.0)]
    ctx = Context({JOB: Outcome(JOB, None, ended_at=9.0)}, [(0.0, 8.0)], hang_s=20)
    checked = check_run([seen_end, away], ctx)
    assert checked.violations == [] and checked.superseded == 2
    never_ended = Context({JOB: Outcome(JOB, None, ended_at=9.0)}, [(0.0, 8.0)], hang_s=20)
    rules = sorted(v.rule for v in check_run([away], never_ended).violations)
    assert rules == ["lost_without_state_lost", "terminal_count"]


def test_the_model_text_is_the_fake_servers_answer() -> None:
    text = model_text("a prompt [[tokens:5]] [[rate:50]]")
    assert len(text.split()) == 5 and text == model_text("a prompt [[tokens:5]]")


@pytest.mark.parametrize(
    ("url", "options"),
    [("http://127.0.0.1:8000", {"minutes": 1}), (None, {"minutes": 0}), (None, {"jobs": 3})],
)
def test_bad_input_is_refused(
    capsys: pytest.CaptureFixture[str], url: str | None, options: dict[str, Any]
) -> None:
    assert bench_command("chaos", url, True, options) == 2
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("violations", [0, 1])
def test_the_exit_code_says_whether_anything_was_violated(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], violations: int
) -> None:
    found = [{"rule": "gap", "watcher": "job x", "job": JOB, "detail": "d", "count": 1}]
    result = {
        "scenario": "chaos",
        "faults": {"api-kill": 1},
        "jobs": 1,
        "job_types": {"ticker": 1},
        "job_ends": {"completed": 1},
        "watchers": 5,
        "events_checked": 10,
        "superseded_views": 0,
        "violations": found[:violations],
        "logs": None,
    }
    monkeypatch.setattr(chaos, "run_chaos", lambda plan, log: result)
    assert bench_command("chaos", None, True, {"minutes": 0.1}) == violations
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and json.loads(out[0])["violations"] == found[:violations]


CHEAP = ("worker-kill", "api-kill", "redis-restore", "redis-empty")


@pytest.mark.timeout(90)
def test_a_short_real_run() -> None:
    """The run itself: every fault injected and recovered from, jobs streamed and checked.
    Whether the server keeps every invariant is the run's finding, not this test's."""
    plan = Plan(minutes=0.3, faults=CHEAP, gap_s=(0.5, 1.0), job_s=(2, 4), hang_s=8, seed=7)
    result = run_chaos(plan, Console(stderr=True))
    if result["logs"]:  # kept for a person to read when anything was violated
        shutil.rmtree(result["logs"])
    assert set(result["faults"]) == set(CHEAP), result["faults"]
    assert result["jobs"] >= 3 and result["events_checked"] > result["jobs"]
    assert result["watchers"] >= 3 * result["jobs"] + 2
    harness = {"submit_failed", "process_exited"}
    assert not [v for v in result["violations"] if v["rule"] in harness], result["violations"]


@pytest.mark.timeout(150)
def test_a_short_real_run_with_sentinel_failovers() -> None:
    """Failovers that lose what the replica missed, repeated: the stack follows each
    without restarts, and every Redis server and sentinel is up at the end. (The
    service's findings are the run's, as above.)"""
    plan = Plan(
        minutes=0.4,
        faults=("sentinel-failover",),
        gap_s=(0.5, 1.0),
        job_s=(2, 4),
        hang_s=8,
        seed=7,
    )
    result = run_chaos(plan, Console(stderr=True))
    if result["logs"]:
        shutil.rmtree(result["logs"])
    log = result["fault_log"]
    assert result["faults"] == {"sentinel-failover": len(log)} and len(log) >= 2, log
    promoted = [re.findall(r"(\S+) promoted", entry["detail"]) for entry in log]
    assert all(a != b for a, b in zip(promoted, promoted[1:], strict=False)), log  # and back
    assert result["jobs"] >= 3 and result["events_checked"] > result["jobs"]
    harness = {"submit_failed", "process_exited"}
    assert not [v for v in result["violations"] if v["rule"] in harness], result["violations"]


def test_a_stream_that_follows_a_job_run_again_after_a_loss_is_not_slow_to_end() -> None:
    """Its first end was taken back by a Redis loss; the job ran again and ended later:
    the stream ends after that end, not 30 s "late" (its poller had stopped at the first)."""
    events = correct()
    again = [
        ev(3, "snapshot", E2, reset=True, **{**SNAPSHOT, "status": "running"}),
        ev(4, "completed", E2, result=None),
    ]
    late = [Received(0, e.id, e.kind, e.data, 40.0) for e in again]
    log = WatchLog("job x", "job", [JOB], events + late, [Ending(0, CLOSED, 40.5)], 40.5)
    ctx = Context({JOB: Outcome(JOB, None, "Hello world", ended_at=6.5)}, [(0.0, 9.0)], 20)
    rules = [v.rule for v in check_run([log], ctx).violations]
    assert "slow_end" not in rules, rules
    log.done_at = 70.0  # but it must still end soon after the end it was sent
    assert "slow_end" in [v.rule for v in check_run([log], ctx).violations]


@pytest.mark.timeout(400)
def test_a_short_real_run_on_a_cluster() -> None:
    """Job state on a local Redis Cluster: a tenant's shard failing over (its old primary
    back as a replica) and a tenant's slot moving, repeated, with a worker killed
    between; the stack follows each without restarts. (The service's findings are the
    run's, as above: BENCHMARKS.md has them.)"""
    faults = ("shard-failover", "slot-move", "worker-kill")
    plan = Plan(minutes=0.5, faults=faults, gap_s=(0.5, 1.0), job_s=(2, 4), hang_s=8, seed=7)
    result = run_chaos(plan, Console(stderr=True))
    if result["logs"]:
        shutil.rmtree(result["logs"])
    assert set(result["faults"]) == set(faults), result["faults"]
    assert result["jobs"] >= 3 and result["events_checked"] > result["jobs"]
    harness = {"submit_failed", "process_exited"}
    assert not [v for v in result["violations"] if v["rule"] in harness], result["violations"]
    print(json.dumps({k: result[k] for k in ("faults", "jobs", "violations", "fault_log")}))
