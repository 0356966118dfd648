"""``pushsvc bench cluster-publish`` (tools/bench/cluster_publish.py): end to end at a tiny
size, on one Redis and then on a local cluster of 3 shards."""

from __future__ import annotations

import pytest

from .test_bench import bench_json


@pytest.mark.timeout(180)
def test_cluster_publish(capsys: pytest.CaptureFixture[str]) -> None:
    result = bench_json(capsys, "cluster-publish", jobs=6, clients=1, duration_s=1)
    for name, shards in (("one_redis", 1), ("three_shards", 3)):
        run = result[name]
        assert run["shards"] == shards and run["jobs_publishing"] == 6
        nodes = run["redis"]
        assert len(nodes) == shards
        # Every event counted once, by the Redis that ran its call; each shard has some
        # (the jobs' tenants take turns: 2 of the 6 on each shard).
        events = sum(n["events"] for n in nodes.values())
        assert events == pytest.approx(run["events_per_s"] * 1, abs=0.1) and events > 0
        assert all(n["events"] > 0 and n["us_per_event"] > 0 for n in nodes.values())
        assert run["load_us_per_event"] > 0
        assert run["publish_call_p99_ms"] >= run["publish_call_p50_ms"] > 0
