"""``pushsvc bench model-limits`` (tools/bench/model_limits.py) end to end at a small size:
two workers under one shared limit, against a model server that answers 429 above it."""

from __future__ import annotations

import pytest

from .test_bench import bench_json


@pytest.mark.timeout(180)
def test_model_limits(capsys: pytest.CaptureFixture[str]) -> None:
    """6 requests per 3 s, 16 jobs: the fleet waits on the limit and collects no 429."""
    result = bench_json(capsys, "model-limits", jobs=16, workers=2, rate=2, duration_s=3)
    assert result["stack"] == "own" and result["params"]["jobs"] == 16
    assert result["limit_per_window"] == 6 and result["window_s"] == 3
    assert result["http_429_seen"] == 0 and result["requests_sent"] == 16
    assert result["jobs"]["completed"] == 16
    assert 0 < result["achieved_vs_limit"] <= 1
