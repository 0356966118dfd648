"""``pushsvc bench cluster-publish``: events a second through the publish path with job
state on one Redis, then on a Redis Cluster of 3 shards (``PUSHSVC_DATA_CLUSTER``), and
each Redis's CPU per event.

Each pass: a private queue Redis (and, for the second, a local cluster of 3 primaries,
no replicas: on a small machine they would take the cores the primaries are measured
on), ``clients`` load processes (redis_load.py, as a worker publishes: one call, two
events a flush) publishing flat out for ``duration_s`` for jobs of 12 tenants, 4 whose
slots are on each shard. Per pass: events/s, the load's CPU per event, and per Redis
(each shard's primary): its events, its CPU per event and per second. On a machine of
few cores the shards and the load share them: the events/s is the machine's, the CPU
per event is each shard's own (BENCHMARKS.md turns it into a model for real hardware).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.crc import key_slot
from rich.console import Console

from ...keys import Keys
from ..cluster import LocalCluster
from .load import Options, pct
from .redis_ceiling import START_S
from .redis_load import EVENTS_PER_CALL, load_processes
from .stack import cpu_seconds, private

TENANTS_PER_SHARD = 4


@dataclass(frozen=True)
class NodeReading:
    cpu_s: float
    calls: int  # publish script calls (EVALSHA)


def _read_node(port: int) -> NodeReading:
    with Redis(port=port, socket_timeout=5) as redis:
        cpu: dict[str, Any] = redis.info("cpu")
        stats: dict[str, Any] = redis.info("commandstats")
    calls = int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    return NodeReading(float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), calls)


def spread_tenants(cluster: LocalCluster | None, keys: Keys) -> tuple[str, ...]:
    """Tenants for the jobs, taken in turn: ``TENANTS_PER_SHARD`` on each shard, one of
    each shard after another (3 x that on one Redis)."""
    if cluster is None:
        return tuple(f"bench{i}" for i in range(3 * TENANTS_PER_SHARD))
    owners = cluster.slot_owners()
    by_port: dict[int, list[str]] = {port: [] for port in owners.values()}
    i = 0
    while any(len(t) < TENANTS_PER_SHARD for t in by_port.values()):
        slot = key_slot(keys.tenant_tag(f"bench{i}").encode())
        port = next(p for (lo, hi), p in owners.items() if lo <= slot <= hi)
        if len(by_port[port]) < TENANTS_PER_SHARD:
            by_port[port].append(f"bench{i}")
        i += 1
    return tuple(t for row in zip(*by_port.values(), strict=True) for t in row)


def _pass(o: Options, log: Console, shards: int) -> dict[str, Any]:
    namespace = f"bench{secrets.token_hex(3)}"
    with private("cluster-publish") as own:
        cluster = LocalCluster(primaries=shards, replicas=0).start() if shards > 1 else None
        try:
            ports = (
                [own.redis.port] if cluster is None else sorted(set(cluster.slot_owners().values()))
            )
            seeds = "" if cluster is None else cluster.seeds
            tenants = spread_tenants(cluster, Keys(namespace))
            with load_processes(
                own.redis.url, namespace, o.jobs, o.clients, (seeds, tenants)
            ) as loads:
                log.print(f"bench: {shards} shard(s), {o.clients} load processes, {o.jobs} jobs")
                before = {p: _read_node(p) for p in ports}
                load_before = cpu_seconds(loads.pids) or 0.0
                publishing = loads.send(time.time() + START_S, o.duration_s, o.jobs, 0)
                took = [t * 1000 for part in loads.answers() for t in part]
                after = {p: _read_node(p) for p in ports}
                load_cpu = (cpu_seconds(loads.pids) or 0.0) - load_before
        finally:
            if cluster is not None:
                cluster.stop()
    events = len(took) * EVENTS_PER_CALL
    nodes = {}
    for port in ports:
        node_events = (after[port].calls - before[port].calls) * EVENTS_PER_CALL
        cpu = after[port].cpu_s - before[port].cpu_s
        nodes[str(port)] = {
            "events": node_events,
            "cpu_s_per_s": round(cpu / o.duration_s, 3),
            "us_per_event": round(cpu / max(1, node_events) * 1e6, 2),
        }
    return {
        "shards": shards,
        "jobs_publishing": publishing,
        "events_per_s": round(events / o.duration_s, 1),
        "load_us_per_event": round(load_cpu / max(1, events) * 1e6, 1),
        "publish_call_p50_ms": pct(took, 0.5),
        "publish_call_p99_ms": pct(took, 0.99),
        "redis": nodes,
    }


def cluster_publish(o: Options, log: Console) -> dict[str, Any]:
    """The scenario: one Redis, then 3 shards, the same load."""
    return {"one_redis": _pass(o, log, 1), "three_shards": _pass(o, log, 3)}
