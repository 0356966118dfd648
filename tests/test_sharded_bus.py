"""The event bus on a real Redis Cluster (sharded_bus.py): channels of tenants on
different shards, subscribed where their slots are; a broken pub/sub client replaced,
every channel subscribed again and the streams told to refill; and the pings that tell
a tenant's streams when messages may have been lost."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from pushsvc.events import QueueStats, StreamQueue, make_bus
from pushsvc.keys import Keys
from pushsvc.settings import Settings
from pushsvc.sharded_bus import ShardedBus, _Ping
from pushsvc.tools.cluster import LocalCluster

pytestmark = pytest.mark.timeout(60)


def new_queue() -> StreamQueue:
    return StreamQueue(100, 1000, 1_000_000, QueueStats())


def tenants_on_each_shard(cluster: LocalCluster, keys: Keys) -> list[str]:
    """One tenant name whose slot is on each primary."""
    owners = cluster.slot_owners()
    found: dict[int, str] = {}
    for i in range(1000):
        slot = key_slot(keys.tenant_tag(f"t{i}").encode())
        port = next(p for (lo, hi), p in owners.items() if lo <= slot <= hi)
        found.setdefault(port, f"t{i}")
    assert len(found) == 3
    return list(found.values())


def message(job_id: str, seq: int) -> str:
    """A published event as the publish script lays it out (frames.Frame.parse)."""
    return f'{seq}.te {seq}.je progress {job_id} {{"seq": {seq}}}'


def parts(cluster: LocalCluster) -> tuple[Keys, ShardedBus, RedisCluster]:
    """The namespace's keys, a bus (as the API makes it) and a publisher, on the cluster."""
    settings = Settings(namespace=f"b{secrets.token_hex(3)}", data_cluster=cluster.seeds)
    bus = make_bus(settings)
    assert isinstance(bus, ShardedBus)
    publisher = RedisCluster.from_url(f"redis://{cluster.seeds.split(',')[0]}")
    return Keys(settings.namespace), bus, publisher


async def test_each_tenants_channels_are_delivered_from_its_shard(
    data_cluster: LocalCluster,
) -> None:
    keys, bus, publisher = parts(data_cluster)
    async with bus, publisher:
        await asyncio.wait_for(bus.connected.wait(), 10)
        for tenant in tenants_on_each_shard(data_cluster, keys):
            queue = new_queue()
            channel = keys.tenant_channel(tenant)
            async with bus.subscription(channel, queue) as ready:
                await ready()  # confirmed: published now, delivered
                assert await publisher.execute_command("SPUBLISH", channel, message("j", 1)) == 1
                frames = await queue.get(10)
                assert [(f.job_id, f.seq) for f in frames] == [("j", 1)]
            assert bus.channel_count == 0


async def test_a_broken_client_is_replaced_and_the_streams_refill(
    data_cluster: LocalCluster,
) -> None:
    keys, bus, publisher = parts(data_cluster)
    tenant = tenants_on_each_shard(data_cluster, keys)[0]
    channel = keys.job_channel(tenant, "j")
    queue = new_queue()
    async with bus, publisher:
        async with bus.subscription(channel, queue, {"j"}) as ready:
            await ready()
            assert bus.reconnects == 1
            old = bus._glide
            assert old is not None
            await old.close()  # the reader's next read fails: a new client
            # Woken when told to refill, which comes once every channel is subscribed again.
            assert await queue.get(20) == [] and queue.resync
            assert bus.reconnects == 2 and bus._glide is not old
            queue.resync = False
            assert await publisher.execute_command("SPUBLISH", channel, message("j", 2)) == 1
            assert [f.seq for f in await queue.get(10)] == [2]
        assert bus.channel_count == 0  # its stream gone: unsubscribed on the new client
        assert await publisher.execute_command("SPUBLISH", channel, message("j", 3)) == 0


async def test_a_stream_that_comes_as_the_last_one_leaves_stays_subscribed(
    data_cluster: LocalCluster,
) -> None:
    """The last stream of a channel leaves (its unsubscribe under way) as a new one
    comes: the new one's subscribe waits for it, so the channel ends up subscribed."""
    keys, bus, publisher = parts(data_cluster)
    channel = keys.tenant_channel(tenants_on_each_shard(data_cluster, keys)[1])
    async with bus, publisher:
        await asyncio.wait_for(bus.connected.wait(), 10)
        first, second = new_queue(), new_queue()
        leaving = bus.subscription(channel, first)
        await (await leaving.__aenter__())()
        left = asyncio.create_task(leaving.__aexit__(None, None, None))
        await asyncio.sleep(0)  # one turn of the loop: its unsubscribe is sent
        async with bus.subscription(channel, second) as ready:
            await ready()
            await left
            assert await publisher.execute_command("SPUBLISH", channel, message("j", 1)) == 1
            assert [f.seq for f in await second.get(10)] == [1]


@pytest.mark.timeout(150)
async def test_a_channel_subscribed_while_its_shard_fails_over_is_confirmed_once_it_is_back(
    data_cluster: LocalCluster,
) -> None:
    """Subscribed after its shard's primary died: each wait raises a connection error
    (the stream sends heartbeats) until the replica took over, then it is confirmed and
    delivers. Regression: glide's own later subscribe was never reported, so the wait
    never ended and streams opened during a failover ended empty."""
    keys, bus, publisher = parts(data_cluster)
    tenant = tenants_on_each_shard(data_cluster, keys)[2]
    channel = keys.tenant_channel(tenant)
    primary = data_cluster.owner(key_slot(keys.tenant_tag(tenant).encode()))
    loop, killed = asyncio.get_running_loop(), asyncio.Event()
    async with bus, publisher:
        await asyncio.wait_for(bus.connected.wait(), 10)
        failing = asyncio.ensure_future(
            asyncio.to_thread(
                data_cluster.fail_over,
                primary,
                on_kill=lambda: loop.call_soon_threadsafe(killed.set),
            )
        )
        try:
            await asyncio.wait_for(killed.wait(), 30)
            queue = new_queue()
            async with bus.subscription(channel, queue) as ready:
                async with asyncio.timeout(90):
                    while True:
                        try:
                            await ready()
                            break
                        except RedisConnectionError:
                            continue  # a stream pauses, sends a heartbeat, waits again
                await failing
                assert await publisher.execute_command("SPUBLISH", channel, message("j", 1)) == 1
                assert [f.seq for f in await queue.get(10)] == [1]
        finally:
            await asyncio.gather(failing, return_exceptions=True)
            await asyncio.to_thread(data_cluster.rejoin, primary)


async def test_a_channel_glide_no_longer_holds_is_subscribed_again_and_its_streams_refill(
    data_cluster: LocalCluster,
) -> None:
    """A stream's channel no longer subscribed while its tenant's pings come back (after
    a failover glide subscribes channels again one by one, the ping channel maybe well
    before a stream's; here the channel is dropped behind the bus's back): the bus
    subscribes it again, then tells its streams to refill (what was published meanwhile
    reached no one). Was: nothing told them, and the stream waited for events forever."""
    keys, bus, publisher = parts(data_cluster)
    tenant = tenants_on_each_shard(data_cluster, keys)[0]
    channel = keys.job_channel(tenant, "j")
    queue = new_queue()
    async with bus, publisher:
        async with bus.subscription(channel, queue, {"j"}) as ready:
            await ready()
            glide = bus._glide
            assert glide is not None
            await glide.sunsubscribe({channel}, timeout_ms=5000)
            assert await publisher.execute_command("SPUBLISH", channel, message("j", 1)) == 0
            told = 0
            async with asyncio.timeout(20):
                while not told or bus._mending:  # told at once, and once subscribed again
                    assert await queue.get(20) == [] and queue.resync
                    queue.resync, told = False, told + 1
            assert await publisher.execute_command("SPUBLISH", channel, message("j", 2)) == 1
            assert [f.seq for f in await queue.get(10)] == [2] and not queue.resync
            assert bus.reconnects == 1  # on the same client


def test_a_ping_that_did_not_come_back_tells_the_streams() -> None:
    ping = _Ping("c")
    assert ping.send() == 1 and not ping.answered(1)  # all back: nothing lost
    ping.send()  # 2: lost
    assert ping.send() == 3 and ping.answered(3)  # 3 back after 2 did not: lost
    assert not ping.overdue()
    ping.send()  # 4, unanswered: overdue only once _LOST_AFTER_S have passed
    ping._since -= 10
    assert ping.overdue() and not ping.overdue()
    assert not ping.answered(4)
