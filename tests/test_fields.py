"""How a job's hash is stored (pushsvc/fields.py): raw, integer and JSON fields round-trip,
and a snapshot takes only its own fields."""

from __future__ import annotations

import pytest

from pushsvc.fields import decode_fields, encode_fields, to_snapshot


@pytest.mark.timeout(10)
def test_fields_round_trip_through_the_hash() -> None:
    fields = {
        "status": "running",  # raw: the Lua script compares it
        "attempt": 2,  # int
        "payload": {"prompt": 'a "quoted"\nline', "n": [1, 2.5, None]},  # JSON
        "result": None,
        "epoch": "3f9a1c2e",
    }
    flat = encode_fields(fields)
    raw = {flat[i].encode(): flat[i + 1].encode() for i in range(0, len(flat), 2)}
    assert raw[b"status"] == b"running" and raw[b"attempt"] == b"2"
    assert decode_fields(raw, b"some text") == {**fields, "output": "some text"}


@pytest.mark.timeout(10)
def test_a_snapshot_keeps_only_its_own_fields() -> None:
    snap = to_snapshot(
        {
            "id": "j",
            "type": "ticker",
            "status": "queued",
            "created_at": 1.0,
            "owner": "w1",
            "arq_id": "x",
            "seq": 3,
        }
    )
    dumped = snap.model_dump()
    assert dumped["seq"] == 3 and "owner" not in dumped and "arq_id" not in dumped
