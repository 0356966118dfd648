"""Frames (pushsvc/frames.py): the stored form parsed, the SSE encoding by job or tenant
position, and the merging of progress and output frames."""

from __future__ import annotations

import json

import pytest

from pushsvc.epoch import StreamPosition
from pushsvc.frames import Frame


@pytest.mark.timeout(10)
def test_the_stored_form_parses_into_both_positions() -> None:
    frame = Frame.parse(b'5.tt11 3.jj22 output job1 {"delta": "a b"}')
    assert frame.tenant_position == StreamPosition(5, "tt11")
    assert frame.position == StreamPosition(3, "jj22")
    assert (frame.kind, frame.job_id, frame.data) == ("output", "job1", '{"delta": "a b"}')
    assert frame.first_seq == 3


@pytest.mark.timeout(10)
def test_sse_encoding_by_job_or_tenant_position() -> None:
    frame = Frame(9, 4, "progress", "job1", '{"progress":50}', "jepoch", "tepoch")
    assert frame.sse(False) == b'id: 4.jepoch\nevent: progress\ndata: {"progress":50}\n\n'
    assert frame.sse(True) == b'id: 9.tepoch\nevent: progress\ndata: {"progress":50}\n\n'
    assert frame.sse(True) is frame.sse(True)  # encoded once


@pytest.mark.timeout(10)
def test_a_frame_without_epochs_has_plain_ids() -> None:
    assert Frame(2, 1, "status", "j", "{}").sse(False).startswith(b"id: 1\n")


@pytest.mark.timeout(10)
def test_data_is_one_line_even_for_multi_line_text() -> None:
    data = json.dumps({"delta": "line one\nline two\r\n"})
    body = Frame(1, 1, "output", "j", data).sse(False).decode()
    lines = body.split("\n")
    assert lines[2] == f"data: {data}" and lines[3:] == ["", ""]
    assert json.loads(lines[2].removeprefix("data: "))["delta"] == "line one\nline two\r\n"


@pytest.mark.timeout(10)
def test_merging_joins_output_and_keeps_the_newest_progress() -> None:
    older = Frame(1, 1, "output", "j", '{"delta":"ab"}', "e", "t")
    merged = older.merge(Frame(2, 2, "output", "j", '{"delta":"cd"}', "e", "t"))
    assert json.loads(merged.data) == {"delta": "abcd"}
    assert (merged.first_seq, merged.seq, merged.tseq) == (1, 2, 2)
    progress = Frame(1, 1, "progress", "j", '{"progress":10}').merge(
        Frame(2, 2, "progress", "j", '{"progress":20}')
    )
    assert progress.data == '{"progress":20}' and progress.first_seq == 1


@pytest.mark.timeout(10)
def test_a_queue_frame_has_no_id_on_either_stream() -> None:
    """Volatile (line.py): EventSource keeps the last id, so a resume is unchanged."""
    frame = Frame(0, 4, "queue", "job1", '{"queue_position":2}', "jepoch")
    assert frame.sse(False) == b'event: queue\ndata: {"queue_position":2}\n\n'
    assert frame.sse(True) is frame.sse(False)
