"""The data plane's cluster client (data_plane.py) on a real local Redis Cluster: a
MULTI/EXEC of one slot follows the slot to its new owner, and a call that cannot run
while the cluster is unsettled is made again, then given up as a connection error."""

from __future__ import annotations

import asyncio
import secrets

import pytest
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
