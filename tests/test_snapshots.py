"""Frames built from stored state (pushsvc/snapshots.py): snapshot, terminal and lost."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pushsvc.epoch import StreamPosition
from pushsvc.frames import Frame
from pushsvc.models import JobSnapshot
from pushsvc.reads import StoredJob
from pushsvc.snapshots import lost_frame, snapshot_frame, state_frames, terminal_frame


def snap(**over: Any) -> JobSnapshot:
    fields = {"id": "j1", "type": "ticker", "status": "running", "created_at": 1.0}
    return JobSnapshot.model_validate({**fields, "seq": 4, "epoch": "je", **over})


@pytest.mark.timeout(10)
def test_a_snapshot_frame_carries_the_job_whole_and_its_positions() -> None:
    frame = snapshot_frame(snap(output="hi"), StreamPosition(9, "te"), reset=True)
    assert (frame.kind, frame.position, frame.tenant_position) == (
        "snapshot",
        StreamPosition(4, "je"),
        StreamPosition(9, "te"),
    )
    body = json.loads(frame.data)
    assert body["job_id"] == "j1" and body["seq"] == 4 and body["reset"] is True
    assert body["output"] == "hi" and "epoch" not in body
    assert "reset" not in json.loads(snapshot_frame(snap(), None, False).data)


@pytest.mark.timeout(10)
def test_the_terminal_frame_comes_from_the_log_or_is_rebuilt() -> None:
    done = snap(status="completed", result={"n": 1}, finished_at=2.0)
    logged = Frame(0, 4, "completed", "j1", '{"logged":true}')
    assert terminal_frame(done, logged, None).data == '{"logged":true}'
    stale = Frame(0, 3, "completed", "j1", '{"logged":true}')
    rebuilt = terminal_frame(done, stale, None)
    assert rebuilt.kind == "completed" and json.loads(rebuilt.data)["result"] == {"n": 1}
    failed = snap(status="failed", error={"code": "x", "message": "m"})
    assert json.loads(terminal_frame(failed, None, None).data)["error"]["code"] == "x"


@pytest.mark.timeout(10)
def test_state_frames_are_built_once_and_end_with_the_terminal_event() -> None:
    stored = StoredJob("t", snap(status="cancelled"), None)
    first = state_frames(stored, reset=False)
    assert [f.kind for f in first] == ["snapshot", "cancelled"]
    again = state_frames(stored, reset=False)
    assert again is not first and all(a is b for a, b in zip(again, first, strict=True))
    assert [f.kind for f in state_frames(StoredJob("t", snap(), None), False)] == ["snapshot"]


@pytest.mark.timeout(10)
def test_a_lost_job_fails_one_past_its_position() -> None:
    frame = lost_frame("j1", StreamPosition(7, "je"), None)
    assert frame.kind == "failed" and frame.position == StreamPosition(8, "je")
    assert json.loads(frame.data)["error"]["code"] == "state_lost"
