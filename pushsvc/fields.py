"""How a job's hash is stored (raw, integer and JSON fields) and the snapshot it shows."""

from __future__ import annotations

import json
from typing import Any

from .models import JobSnapshot

# Hash fields kept as raw strings (Lua reads or appends them); all others hold JSON.
RAW_FIELDS = frozenset(
    {"status", "tenant", "arq_id", "cancel", "type", "priority", "epoch", "gen", "owner", "tep"}
    | {"wcall"}  # a worker's last call's token (lua/publish.lua)
)
INT_FIELDS = frozenset({"seq", "attempt", "max_attempts", "run", "updated_at"})
SNAPSHOT_FIELDS = frozenset(JobSnapshot.model_fields)
# Event bodies leave these out: the script prepends the seq; the epoch is in the SSE id.
EVENT_EXCLUDE: set[str] = {"seq", "epoch"}


def encode_fields(fields: dict[str, Any]) -> list[str]:
    """Flatten ``fields`` into HSET arguments, JSON-encoding all but the raw and int fields."""
    flat: list[str] = []
    for name, value in fields.items():
        flat.append(name)
        if name in RAW_FIELDS or name in INT_FIELDS:
            flat.append(str(value))
        else:
            flat.append(json.dumps(value, separators=(",", ":")))
    return flat


def decode_fields(raw: dict[bytes, bytes], output: bytes | None) -> dict[str, Any]:
    out: dict[str, Any] = {"output": (output or b"").decode()}
    for key_b, value_b in raw.items():
        key, value = key_b.decode(), value_b.decode()
        if key in RAW_FIELDS:
            out[key] = value
        elif key in INT_FIELDS:
            out[key] = int(value)
        else:
            out[key] = json.loads(value)
    return out


def to_snapshot(fields: dict[str, Any]) -> JobSnapshot:
    return JobSnapshot.model_validate({k: v for k, v in fields.items() if k in SNAPSHOT_FIELDS})
