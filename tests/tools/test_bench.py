"""``pushsvc bench`` (tools/bench/command.py, load.py, push_poll.py): every scenario end to
end at tiny sizes, on its own stack."""

from __future__ import annotations

import json
from typing import Any

import pytest
from rich.console import Console

from pushsvc.tools.bench.command import bench_command
from pushsvc.tools.bench.push_poll import staleness
from pushsvc.tools.bench.stack import own_stack


def bench_json(
    capsys: pytest.CaptureFixture[str], scenario: str, url: str | None = None, **options: Any
) -> dict[str, Any]:
    """Run the scenario with --json: exit 0 and exactly one JSON object on stdout."""
    code = bench_command(scenario, url, True, options)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1, captured.out
    result: dict[str, Any] = json.loads(lines[0])
    assert result["scenario"] == scenario and "figure" in captured.err  # the table, on stderr
    return result


def assert_fanout(fan: dict[str, Any], streams: int) -> None:
    assert fan["open_streams"] == streams and fan["streams_dropped"] == 0
    assert fan["events_delivered"] > 0 and fan["events_per_s"] > 0
    assert fan["latency_max_ms"] >= fan["latency_p99_ms"] >= fan["latency_p50_ms"] >= 0
    assert 1 <= fan["redis_connections"] <= 3 and 1 <= fan["redis_sockets"] <= 3
    assert fan["api_cpu_s"] >= 0 and fan["cpu_us_per_event"] >= 0
    assert fan["rss_streams_bytes"] > 0 and fan["rss_per_stream_bytes"] is not None


@pytest.mark.timeout(60)
def test_fanout(capsys: pytest.CaptureFixture[str]) -> None:
    result = bench_json(capsys, "fanout", streams=20, jobs=3, duration_s=3)
    assert result["stack"] == "own" and result["params"]["streams"] == 20
    assert result["mux_streams"] == 10
    assert_fanout(result, 20)


@pytest.mark.timeout(60)
def test_push_vs_poll(capsys: pytest.CaptureFixture[str]) -> None:
    result = bench_json(capsys, "push-vs-poll", clients=10, jobs=2, duration_s=3)
    sse, poll = result["sse"], result["poll"]
    assert sse["requests"] == 10 and poll["requests"] > sse["requests"]
    for mode in (sse, poll):
        assert mode["changes_seen"] > 0 and mode["api_cpu_s"] >= 0
        assert mode["staleness_max_s"] >= mode["staleness_p99_s"] >= mode["staleness_p50_s"] >= 0
    assert poll["staleness_p50_s"] > sse["staleness_p50_s"]
    assert result["requests_ratio"] > 1


@pytest.mark.timeout(60)
def test_push_vs_poll_with_several_jobs_per_client(capsys: pytest.CaptureFixture[str]) -> None:
    """Each client watches 3 jobs: one multiplexed stream, against 3 pollers."""
    result = bench_json(capsys, "push-vs-poll", clients=4, jobs=3, per_client=3, duration_s=3)
    sse, poll = result["sse"], result["poll"]
    assert result["params"]["per_client"] == 3
    assert sse["requests"] == 4 and poll["requests"] >= 4 * 3
    assert sse["changes_seen"] > 0 and poll["changes_seen"] > 0
    assert poll["staleness_p50_s"] > sse["staleness_p50_s"]


@pytest.mark.timeout(60)
def test_throughput(capsys: pytest.CaptureFixture[str]) -> None:
    result = bench_json(capsys, "throughput", jobs=60, workers=1, clients=8)
    assert result["completed"] == 60 and result["jobs_per_s"] > 0
    assert result["queue_wait_p99_s"] >= result["queue_wait_p50_s"] >= 0
    assert result["api_cpu_us_per_job"] > 0


@pytest.mark.timeout(90)
def test_scaleout(capsys: pytest.CaptureFixture[str]) -> None:
    result = bench_json(capsys, "scaleout", jobs=40, workers=1, clients=8, streams=10, duration_s=2)
    assert result["apis"] == 2
    assert result["throughput_single"]["completed"] == result["throughput"]["completed"] == 40
    assert result["throughput_ratio"] > 0
    assert_fanout(result["fanout"], 10)


@pytest.mark.timeout(60)
def test_a_running_stack_by_url(capsys: pytest.CaptureFixture[str]) -> None:
    """With --url the bench finds the API process by its port for CPU, RSS and sockets."""
    with own_stack(1, 1, Console(stderr=True)) as target:
        result = bench_json(capsys, "fanout", target.urls[0], streams=6, jobs=2, duration_s=2)
    assert result["stack"] == "url"
    assert_fanout(result, 6)


@pytest.mark.parametrize(
    ("scenario", "url", "options"),
    [
        ("nope", None, {}),
        ("fanout", "http://10.1.2.3:8000", {}),
        ("fanout", None, {"clients": 5}),
        ("throughput", None, {"jobs": 0}),
    ],
)
def test_bad_input_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str], scenario: str, url: str | None, options: dict[str, Any]
) -> None:
    assert bench_command(scenario, url, True, options) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "pushsvc bench:" in captured.err


def test_staleness_counts_a_change_never_polled_until_a_newer_state_is_seen() -> None:
    seen = [(10.0, 2), (12.0, 4), (14.0, 4)]
    changes = {1: 9.0, 2: 9.5, 3: 10.5, 4: 11.0}
    assert staleness(seen, changes) == [1.5, 1.0]  # seq 3 was never seen: stale until seq 4


def test_the_help_names_every_scenario() -> None:
    from typer.testing import CliRunner

    from pushsvc.cli import cli
    from pushsvc.tools.bench.command import DEFAULTS

    result = CliRunner().invoke(cli, ["bench", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    named = {w.strip() for w in result.output.split("|")}
    missing = [s for s in DEFAULTS if not any(s in w.split() for w in named)]
    assert missing == []
