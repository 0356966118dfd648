"""The job state machine (pushsvc/transitions.py): each transition's event, the fields
it sets, and the states it may start from."""

from __future__ import annotations

from typing import Any

import pytest

from pushsvc import transitions
from pushsvc.errors import JobError, RetryableJobError
from pushsvc.models import JobStatus

RUNNING, QUEUED = (JobStatus.RUNNING,), (JobStatus.QUEUED,)


def job(**over: Any) -> dict[str, Any]:
    base = {"id": "j1", "type": "ticker", "status": "queued", "attempt": 1, "max_attempts": 3}
    return {**base, "created_at": 1.0, "run": 1, "output": "", **over}


@pytest.mark.timeout(10)
def test_a_first_start_is_a_status_event_from_queued() -> None:
    change = transitions.start(job(), "worker-1", now=5.0)
    assert (change.kind, change.expect) == ("status", QUEUED)
    assert change.data == {"status": "running", "attempt": 1}
    assert change.fields["owner"] == "worker-1" and change.fields["started_at"] == 5.0
    assert change.fields["output"] == "" and change.fields["status"] == "running"


@pytest.mark.timeout(10)
def test_a_later_attempt_after_output_starts_as_a_whole_snapshot() -> None:
    change = transitions.start(job(attempt=2, output="old text"), "w", now=5.0)
    assert change.kind == "snapshot" and change.expect == QUEUED
    assert change.data["output"] == "" and change.data["attempt"] == 2
    assert "seq" not in change.data and "epoch" not in change.data


@pytest.mark.timeout(10)
def test_progress_and_output_run_only_while_running() -> None:
    progress = transitions.progress({"progress": 40.0})
    assert (progress.kind, progress.fields, progress.expect) == ("progress", progress.data, RUNNING)
    output = transitions.output("abc")
    assert (output.kind, output.data, output.delta, output.fields) == (
        "output",
        {"delta": "abc"},
        "abc",
        {},
    )


@pytest.mark.timeout(10)
def test_complete_clears_an_earlier_error() -> None:
    change = transitions.complete({"n": 1})
    assert change.data == {"result": {"n": 1}, "error": None}
    assert change.fields["status"] == "completed" and change.fields["error"] is None
    assert change.fields["progress"] == 100.0 and change.expect == RUNNING


@pytest.mark.timeout(10)
def test_fail_is_never_retryable_and_keeps_partial_results_as_json() -> None:
    change = transitions.fail(RetryableJobError("late", result={"at": object()}))
    assert change.kind == "failed" and change.fields["status"] == "failed"
    assert change.data["error"]["retryable"] is False
    assert isinstance(change.data["result"]["at"], str)


@pytest.mark.timeout(10)
def test_cancel_retry_and_new_run_name_their_states() -> None:
    assert transitions.cancelled(QUEUED).expect == QUEUED
    assert transitions.cancelled().fields["status"] == "cancelled"
    note = transitions.request_cancel(2)
    assert note.fields == {"cancel": "1"} and note.data["cancel_requested"] is True
    later = transitions.retry_later(JobError("x", retryable=True), 2, "j1.2", 0.12345, None)  # type: ignore[arg-type]
    assert later.data["retry_in_s"] == 0.123 and later.fields["attempt"] == 2
    assert later.fields["owner"] == "" and later.expect == RUNNING
    rerun = transitions.new_run(job(status="failed", run=1, output="x"), "j1.9", None)  # type: ignore[arg-type]
    assert rerun.kind == "snapshot" and rerun.fields["run"] == 2
    assert set(rerun.expect) == {JobStatus.FAILED, JobStatus.CANCELLED}
    assert rerun.data["status"] == "queued" and rerun.data["output"] == ""
