"""``pushsvc bench token-latency`` and ``workers`` (tools/bench/tokens.py): each end to
end at a tiny size, on its own stack with the stamping model server."""

from __future__ import annotations

from typing import Any

import pytest

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
