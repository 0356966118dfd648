"""``pushsvc bench neighbours`` (tools/bench/neighbours.py) end to end at a tiny size."""

from __future__ import annotations

import pytest

from .test_bench import bench_json


@pytest.mark.timeout(120)
def test_neighbours(capsys: pytest.CaptureFixture[str]) -> None:
    result = bench_json(capsys, "neighbours", streams=10, clients=10, jobs=20, duration_s=1)
    assert result["stack"] == "own" and result["params"]["streams"] == 10
    readers, herd = result["readers"], result["herd"]
    assert readers["answers"] == {"200": 10} and readers["open_streams"] == 10
    assert herd["outcomes"] == {"good": 10}
    assert result["replays"]["outcomes"] == {"good": 20}
    assert set(result["listing"]["answers"]) == {"200"}
    for attack in ("readers", "herd", "replays", "listing"):
        figures = result[attack]
        assert figures["neighbour_requests"] > 0 and figures["neighbour_failed"] == 0
        assert figures["neighbour_max_ms"] >= figures["neighbour_p99_ms"] > 0
        assert figures["internal_errors"] == figures["pool_timeouts"] == 0
