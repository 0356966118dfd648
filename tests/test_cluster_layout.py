"""The tenant-tagged key layout (pushsvc/keys.py) on a real Redis Cluster (3 primaries,
3 replicas, started here): Redis itself puts every key and channel of a tenant's
publish call in the tenant's slot, one script may touch them all and SPUBLISH to both
channels there, a sharded subscriber of the shard gets the messages, and pushsvc's own
creation and publish scripts run there for tenants on different shards."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator
from importlib import resources

import pytest
from redis.cluster import ClusterNode as Seed
from redis.cluster import RedisCluster
from redis.crc import key_slot

from pushsvc.keys import Keys
from pushsvc.publish import PublishCall
from pushsvc.settings import Settings
from pushsvc.tools.cluster import LocalCluster

from .test_publish import LUA, lua_names

TENANTS = ["tenant-a", "tenant-b", "tenant-c", "local", "a:b|c d", "ü"]
# Touches every key it is given and publishes to its channels, on the keys' shard.
TOUCH = """
for _, key in ipairs(KEYS) do redis.call('EXISTS', key) end
for _, channel in ipairs(ARGV) do redis.call('SPUBLISH', channel, 'm') end
return #KEYS
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    local = LocalCluster().start()
    seeds = [Seed("127.0.0.1", n.port) for n in local.nodes]
    client = RedisCluster(startup_nodes=seeds, socket_timeout=5)
    try:
        yield client
    finally:
        client.close()
        local.stop()


def tenant_call(tenant: str) -> tuple[list[str], list[str]]:
    """A publish call's keys and channels that live in the tenant's slot."""
    keys, a = Keys("ns"), lua_names("ARGV")
    layout, args = PublishCall("job-1", tenant, "progress", {}).layout(keys, Settings())
    named = [*layout, keys.tenant_index(tenant), keys.idempotency(tenant, "d")]
    return named, [args[a["A_JOB_CHANNEL"]], args[a["A_TENANT_CHANNEL"]]]


@pytest.mark.timeout(90)
def test_a_tenants_publish_call_is_one_slot_on_a_cluster(cluster: RedisCluster) -> None:
    owners = set()
    for tenant in TENANTS:
        keys, channels = tenant_call(tenant)
        slots = {cluster.keyslot(name) for name in [*keys, *channels]}  # Redis's own
        assert slots == {key_slot(tenant.encode())}, tenant
        owners.add(cluster.get_node_from_key(keys[0]).name)
        assert cluster.eval(TOUCH, len(keys), *keys, *channels) == len(keys)
    assert len(owners) > 1  # the tenants spread over the shards


@pytest.mark.timeout(90)
def test_a_sharded_subscriber_gets_the_calls_messages(cluster: RedisCluster) -> None:
    keys, channels = tenant_call("tenant-b")
    pubsub = cluster.pubsub()
    try:
        for channel in channels:
            pubsub.ssubscribe(channel)
        node = cluster.get_node_from_key(channels[0])
        got: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + 30

        def read(kind: str) -> None:  # until both channels gave one of this kind
            while len([g for g in got if g[0] == kind]) < len(channels):
                assert time.monotonic() < deadline, got
                message = pubsub.get_sharded_message(timeout=1.0, target_node=node)
                if message is not None:
                    got.append((message["type"], message["channel"]))

        read("ssubscribe")  # subscribed on the shard: now the call's messages
        cluster.eval(TOUCH, len(keys), *keys, *channels)
        read("smessage")
        got = [g for g in got if g[0] == "smessage"]
        assert sorted(c for _, c in got) == sorted(c.encode() for c in channels)
    finally:
        pubsub.close()


def lua(name: str) -> str:
    return (resources.files("pushsvc") / "lua" / name).read_text()


@pytest.mark.timeout(90)
def test_the_creation_and_publish_scripts_run_on_a_cluster(cluster: RedisCluster) -> None:
    """Each script call touches only its tenant's slot (the queue's keys are calls of
    their own, the store's epoch is each tenant's): a cluster runs them as they are."""
    create, publish = LUA + lua("create.lua"), LUA + lua("publish.lua")
    keys, owners = Keys(f"c{secrets.token_hex(3)}"), set()
    for tenant in ["tenant-a", "tenant-b", "tenant-c"]:
        job_id = str(uuid.uuid4())
        fields = {"id": job_id, "type": "ticker", "tenant": tenant, "status": "queued"}
        fields |= {"payload": {}, "attempt": 1, "max_attempts": 1, "run": 1}
        fields |= {"arq_id": f"{job_id}.1", "created_at": time.time(), "output": ""}
        made = PublishCall(job_id, tenant, "snapshot", {"status": "queued"}, fields)
        layout, args = made.layout(keys, Settings(), "run-1")
        index = keys.tenant_index(tenant)
        created, epoch = cluster.eval(create, len(layout) + 2, *layout, index, index, *args)
        assert created == 1 and epoch
        moved = PublishCall(job_id, tenant, "progress", {"progress": 50}, {"progress": 50})
        layout, args = moved.layout(keys, Settings(), "run-1")
        seq, status, _, same = cluster.eval(publish, len(layout), *layout, *args)
        assert (seq, status, same) == (2, b"queued", epoch)
        job = keys.job(tenant, job_id)
        assert cluster.hget(job, "progress") == b"50"
        assert cluster.zscore(keys.outbox(tenant), f"{job_id}.1") is not None
        owners.add(cluster.get_node_from_key(job).name)
    assert len(owners) > 1  # the tenants are on different shards
