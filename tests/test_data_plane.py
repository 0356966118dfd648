"""The data plane's cluster client (data_plane.py) on a real local Redis Cluster: a
MULTI/EXEC of one slot follows the slot to its new owner, and a call that cannot run
while the cluster is unsettled is made again, then given up as a connection error."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from pushsvc import data_plane
from pushsvc.data_plane import connect_data, settled, transaction
from pushsvc.settings import Settings
from pushsvc.tools.cluster import LocalCluster

pytestmark = pytest.mark.timeout(60)


async def test_a_transaction_follows_its_slot_to_a_new_owner(data_cluster: LocalCluster) -> None:
    data = connect_data(Settings(data_cluster=data_cluster.seeds), socket_timeout=5)
    assert data is not None
    key = f"{{move-{secrets.token_hex(3)}}}:x"
    try:
        await data.set(key, "1")  # the client's map now says where the slot is
        slot = key_slot(key.encode())
        target = next(n for n in data_cluster.primary_nodes() if n != data_cluster.owner(slot))
        await asyncio.to_thread(data_cluster.move_slot, slot, target)
        # The map is stale: the old owner answers MOVED inside MULTI; asked again, right.
        assert await transaction(data, key, lambda p: (p.get(key), p.incr(key))) == [b"1", 2]
        assert data_cluster.owner(slot) == target
    finally:
        await data.close_all()


async def test_a_call_the_cluster_keeps_refusing_is_a_connection_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(data_plane, "_SETTLE_S", 0.2)
    tries = 0

    async def moving() -> None:
        nonlocal tries
        tries += 1
        raise data_plane.ResponseError(
            "Command # 1 (GET {t}:x) of pipeline caused error: ('TRYAGAIN Multiple keys',)"
        )

    with pytest.raises(RedisConnectionError):
        await settled(moving)
    assert tries > 1  # made again before giving up

    async def refused() -> None:  # not the cluster's state: raised at once
        raise data_plane.ResponseError("ERR wrong number of arguments")

    with pytest.raises(data_plane.ResponseError):
        await settled(refused)


async def connections_named(cluster: LocalCluster, name: str) -> dict[int, int]:
    """How many connections named ``name`` each node has (its ``CLIENT LIST``)."""
    counts = {}
    for node in cluster.nodes:
        async with Redis(port=node.port) as client:
            listed = await client.client_list()
        counts[node.port] = sum(c.get("name") == name for c in listed)
    return counts


@pytest.mark.parametrize("calls", [2, None])
async def test_calls_in_flight_bound_the_connections_to_each_node(
    data_cluster: LocalCluster, calls: int | None
) -> None:
    """200 overlapping commands, pipelines and transactions over tenants on every shard:
    with ``calls`` (the API's pool size), at most that many connections to a node for
    commands and that many for transactions, all answered; without, one per overlap."""
    name = f"gated-{secrets.token_hex(3)}"
    settings = Settings(data_cluster=data_cluster.seeds)
    data = connect_data(settings, calls, socket_timeout=5, client_name=name)
    assert data is not None
    keys = [f"{{gate-{secrets.token_hex(2)}-{i}}}:n" for i in range(12)]

    async def work(i: int) -> object:
        key = keys[i % len(keys)]
        if i % 3 == 0:
            return await data.incr(key)
        if i % 3 == 1:
            async with data.pipeline() as pipe:
                pipe.incr(key).get(key)
                return await pipe.execute()
        return await transaction(data, key, lambda p: (p.incr(key), p.get(key)))

    try:
        answers = await asyncio.gather(*(work(i) for i in range(200)))
        assert len(answers) == 200 and all(a is not None for a in answers)
        total = sum([int(await data.get(key) or 0) for key in keys])
        assert total == 200  # each incr once
        counts = await connections_named(data_cluster, name)
        if calls is None:
            assert max(counts.values()) > 4, counts
        else:
            assert 0 < max(counts.values()) <= 2 * calls, counts
    finally:
        await data.close_all()
