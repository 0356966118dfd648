"""The edge models (pushsvc/models.py): statuses, the snapshot, the submit body."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pushsvc.models import TERMINAL, JobSnapshot, JobStatus, Priority, SubmitRequest


@pytest.mark.timeout(10)
def test_terminal_statuses() -> None:
    assert TERMINAL == {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED}
    assert [s.terminal for s in JobStatus] == [False, False, True, True, True]
    assert JobStatus("queued") == "queued"


@pytest.mark.timeout(10)
def test_a_snapshot_has_defaults_and_leaves_epoch_optional_in_its_schema() -> None:
    snap = JobSnapshot(id="j", type="ticker", status="running", created_at=1.0)
    assert snap.status is JobStatus.RUNNING and snap.priority is Priority.NORMAL
    assert (snap.progress, snap.output, snap.seq, snap.epoch) == (0.0, "", 0, "")
    required = JobSnapshot.model_json_schema(mode="serialization")["required"]
    assert "seq" in required and "epoch" not in required


@pytest.mark.timeout(10)
def test_the_submit_body_refuses_unknown_fields_and_bad_values() -> None:
    body = SubmitRequest.model_validate({"type": "ticker"})
    assert body.payload == {} and body.priority is Priority.NORMAL
    for bad in ({"type": ""}, {"type": "t", "extra": 1}, {"type": "t", "priority": "urgent"}):
        with pytest.raises(ValidationError):
            SubmitRequest.model_validate(bad)
