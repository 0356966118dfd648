"""``pushsvc bench redis-ceiling`` (tools/bench/redis_ceiling.py, redis_load.py): end to end
at a tiny size, on its own Redis with two load processes and two subscribers."""

from __future__ import annotations

from typing import Any

import pytest

from .test_bench import bench_json


def assert_step(row: dict[str, Any], busy: bool) -> None:
    """``busy``: thousands of calls, enough for CPU accounting's ticks to show."""
    assert row["calls_sent"] > 0 and row["calls_per_s"] > 0
    # Two events a call, counted from the same EVALSHA calls (both rounded to 0.1).
    assert row["events_per_s"] == pytest.approx(2 * row["calls_per_s"], abs=0.16)
    assert row["redis_script_us_per_event"] > 0 and 0 <= row["machine_busy"] <= 1
    cpu = ("redis_cpu_s_per_s", "redis_us_per_event", "load_cpu_s_per_s")
    assert all(row[f] > 0 if busy else row[f] >= 0 for f in cpu)
    assert row["publish_call_p99_ms"] >= row["publish_call_p50_ms"] > 0


@pytest.mark.timeout(120)
def test_redis_ceiling(capsys: pytest.CaptureFixture[str]) -> None:
    result = bench_json(capsys, "redis-ceiling", jobs=4, clients=2, streams=2, duration_s=1)
    # A flush is one call (transitions.flush) of two events: progress, then output.
    assert result["calls_per_flush"] == 1 and result["events_per_call"] == 2
    for k in (0, 2):
        phase = result[f"subscribers_{k}"]
        steps = phase["steps"]
        assert set(steps) <= {"1", "2", "4", "flat_out"}
        assert steps["flat_out"]["jobs"] == 4  # every job, without pause (32 at most each)
        for name, row in steps.items():
            assert_step(row, busy=name == "flat_out")
            if name != "flat_out":  # paced: jobs x 10 flushes/s x 1 call x 2 events offered
                assert row["offered_events_per_s"] == row["jobs"] * 10 * 2
                assert isinstance(row["kept_up"], bool)
        assert phase["max_events_per_s"] == max(r["events_per_s"] for r in steps.values())
        assert phase["one_core_events_per_s"] > 0 and phase["one_core_jobs_at_rate"] > 0
        assert phase["script_commands_us_per_event"]["xadd"] > 0  # two XADDs an event
        assert isinstance(phase["limited_by"], str)
    # Every subscriber read every event published on the job channels while it listened:
    # two messages a call on a job's channel.
    subscribed = result["subscribers_2"]
    assert subscribed["messages_per_subscriber"] == subscribed["messages_expected"] > 0
    assert subscribed["messages_expected"] % 2 == 0
    # Every publish call counted once, by the load and by Redis; each call's two events
    # counted in the jobs' sequences; each event publishes on the job's channel and the
    # tenant's.
    check = result["check"]
    assert check["calls_sent"] == check["redis_script_calls"] > 0
    assert check["jobs_seq_events"] == 2 * check["redis_script_calls"] == check["events_sent"]
    assert check["redis_publishes"] == 2 * check["events_sent"]
    sent = sum(
        r["calls_sent"] for k in (0, 2) for r in result[f"subscribers_{k}"]["steps"].values()
    )
    assert sent == check["calls_sent"]


@pytest.mark.timeout(10)
def test_redis_ceiling_refuses_a_url(capsys: pytest.CaptureFixture[str]) -> None:
    from pushsvc.tools.bench.command import bench_command

    assert bench_command("redis-ceiling", "http://127.0.0.1:9", True, {}) == 1
    assert "own Redis" in capsys.readouterr().err
