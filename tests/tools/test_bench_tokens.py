"""``pushsvc bench token-latency`` and ``workers`` (tools/bench/tokens.py): each end to
end at a tiny size, on its own stack with the stamping model server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pushsvc.tools.bench.tokens import TokenPath

from .test_bench import bench_json


def assert_token_path(figures: dict[str, Any], jobs: int, tokens: int, watchers: int) -> None:
    assert figures["jobs_ended"] == {"completed": jobs}
    assert figures["tokens"] == jobs * tokens  # every token seen once per job, none lost
    assert figures["token_deliveries"] == jobs * tokens * watchers
    assert figures["replayed_stamps"] == 0  # every watcher saw every token live
    assert figures["max_ms"] >= figures["p99_ms"] >= figures["p50_ms"] > 0
    assert figures["p99_ms"] >= figures["to_publish_p99_ms"] > 0


@pytest.mark.timeout(60)
def test_token_latency(capsys: pytest.CaptureFixture[str]) -> None:
    result = bench_json(capsys, "token-latency", jobs=2, streams=6, rate=20, duration_s=1.5)
    assert result["watchers"] == 6 and result["publish_rate_hz"] > 0
    assert_token_path(result, jobs=2, tokens=30, watchers=3)
    assert isinstance(result["target_met"], bool)


@pytest.mark.timeout(60)
def test_workers(capsys: pytest.CaptureFixture[str]) -> None:
    result = bench_json(capsys, "workers", jobs=3, rate=20, duration_s=1.5)
    step = result["steps"]["3"]
    assert list(result["steps"]) == ["3"]  # the steps below 100 are the asked size only
    assert_token_path(step, jobs=3, tokens=30, watchers=1)
    assert isinstance(step["keeps_pace"], bool) and isinstance(step["p99_met"], bool)


@pytest.mark.timeout(10)
def test_token_bench_refuses_a_url(capsys: pytest.CaptureFixture[str]) -> None:
    from pushsvc.tools.bench.command import bench_command

    assert bench_command("workers", "http://127.0.0.1:9", True, {}) == 1
    assert "own stack" in capsys.readouterr().err


def output(job: str, ts: float, *stamps_ms: float) -> str:
    """An output event's data as the API sends it; the text JSON escapes beside each stamp."""
    delta = "".join(f'say "hi" \u00e9\n<t:{ms:.3f}>' for ms in stamps_ms)
    return json.dumps({"job_id": job, "ts": ts, "delta": delta}, separators=(",", ":"))


def test_token_path_counts_from_raw_events() -> None:
    """Watchers get each event's raw text: per-job ones parse none but what they count,
    the all-jobs one reads each counted event's job (and skips other runs' jobs)."""
    path = TokenPath(frozenset({"a", "b"}))
    first, second, every = (
        path.watcher(True, "a"),
        path.watcher(False, "a"),
        path.watcher(True, None),
    )
    replay = json.dumps({"job_id": "a", "output": "x<t:5.000> y<t:6.000>"})
    for on_event in (first, second):
        on_event("snapshot", replay)
        on_event("progress", "not JSON: never parsed")
        on_event("output", output("a", 10.0, 1000, 2000))
    every("output", output("b", 20.0, 3000))
    every("output", output("other-run", 20.0, 4000))
    every("queue", "not JSON either")
    assert path.replayed == 4 and len(path.total) == 5
    assert path.written == [1.0, 2.0, 3.0] and path.to_publish == [9.0, 8.0, 17.0]
    assert path.first == {"a": 1.0, "b": 3.0} and path.last == {"a": 2.0, "b": 3.0}
    second("completed", "{}")
    every("failed", json.dumps({"job_id": "other-run"}))
    assert path.ended == {"a"}
    every("cancelled", json.dumps({"job_id": "b"}))
    assert path.ended == {"a", "b"}


def test_a_step_whose_jobs_never_all_streamed_at_once_does_not_keep_pace() -> None:
    from pushsvc.tools.bench.worker_load import _step

    fine = {"to_publish_p99_ms": 120.0, "worker_cores": 0.5, "p99_ms": 130.0}
    assert _step({**fine, "window": "steady"}) == {"keeps_pace": True, "p99_met": True}
    assert _step({**fine, "window": "whole run"})["keeps_pace"] is False
    assert _step({**fine, "window": "steady", "worker_cores": 0.95})["keeps_pace"] is False
