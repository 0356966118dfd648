"""``pushsvc bench fanout --baseline broadcaster`` (tools/bench/baseline.py, load.py
``fanout_beside``): pushsvc's API and the broadcaster server fed by one worker, measured
in one run, at a tiny size."""

from __future__ import annotations

from typing import Any

import pytest

from pushsvc.tools.bench.command import bench_command

from .test_bench import bench_json


@pytest.mark.timeout(60)
def test_fanout_beside_broadcaster(capsys: pytest.CaptureFixture[str]) -> None:
    """Both servers carry the same tickers' events to their half of the streams."""
    result = bench_json(capsys, "fanout", streams=8, jobs=2, duration_s=3, baseline="broadcaster")
    assert result["params"]["baseline"] == result["baseline"] == "broadcaster"
    for name in ("pushsvc", "broadcaster"):
        side = result[name]
        assert side["streams"] == 4 and side["streams_dropped"] == 0
        assert side["events_delivered"] > 0 and side["cpu_s"] >= 0
        assert side["latency_p99_ms"] >= side["latency_p50_ms"] >= 0
        assert side["rss_streams_bytes"] > 0
    assert result["cpu_ratio"] is None or result["cpu_ratio"] >= 0


@pytest.mark.parametrize(
    ("scenario", "url", "options"),
    [
        ("fanout", None, {"baseline": "nope"}),
        ("throughput", None, {"baseline": "broadcaster"}),
        ("fanout", "http://127.0.0.1:9", {"baseline": "broadcaster"}),
        ("fanout", None, {"baseline": "broadcaster", "streams": 1}),
    ],
)
def test_a_baseline_only_for_fanout_on_its_own_stack(
    capsys: pytest.CaptureFixture[str], scenario: str, url: str | None, options: dict[str, Any]
) -> None:
    assert bench_command(scenario, url, True, options) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "pushsvc bench:" in captured.err
