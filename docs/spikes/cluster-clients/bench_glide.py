"""valkey-glide: tests 1-3 (subscriptions/conn count, script cost, delivery)."""

import asyncio
import sys

from glide import GlideClusterClient, GlideClusterClientConfiguration, NodeAddress, Script

from common import LUA, Meter, tcp_detail, tenants_per_shard

N_CALLS, CONC, N_MSG = 5000, 32, 30000
CFG = GlideClusterClientConfiguration
PubSubChannelModes = CFG.PubSubChannelModes


def config(with_pubsub: bool) -> CFG:
    subs = CFG.PubSubSubscriptions(channels_and_patterns={PubSubChannelModes.Sharded: set()}, callback=None, context=None)
    return CFG(addresses=[NodeAddress("127.0.0.1", 7101)], pubsub_subscriptions=subs if with_pubsub else None)


async def script_bench(client, tenants):
    script = Script(LUA)

    async def worker(k):
        for i in range(k, N_CALLS, CONC):
            t = tenants[i % len(tenants)]
            await client.invoke_script(script, keys=[f"{{{t}}}:job:{i}", f"{{{t}}}:log"], args=["running", f"{{{t}}}:ch:job"])

    await asyncio.gather(*(worker(k) for k in range(CONC)))
    with Meter() as m:
        await asyncio.gather(*(worker(k) for k in range(CONC)))
    print(f"script: {N_CALLS / m.wall:.0f} calls/s, {m.cpu / N_CALLS * 1e6:.0f} us CPU/call; conns {tcp_detail()}")


async def main(with_pubsub_cfg: bool):
    tenants = tenants_per_shard(2)
    client = await GlideClusterClient.create(config(with_pubsub_cfg))
    print("conns after connect", tcp_detail())
    await script_bench(client, tenants)
    chans = [f"{{{t}}}:ch:job{j}" for t in tenants for j in range(5)]
    await client.ssubscribe(set(chans), timeout_ms=2000)
    print("subscribed", await client.get_subscriptions(), "conns", tcp_detail())
    await client.sunsubscribe(set(chans[:10]), timeout_ms=2000)
    await client.ssubscribe({"{t0}:ch:new"}, timeout_ms=2000)
    st = await client.get_subscriptions()
    print("after unsub 10/sub 1:", st, "conns", tcp_detail())
    n = await client.publish("hello", "{t0}:ch:new", sharded=True)
    msg = await asyncio.wait_for(client.get_pubsub_message(), 3)
    print("dynamic sub delivery", n, msg)
    chans = chans[10:]
    proc = await asyncio.create_subprocess_exec(sys.executable, "publisher.py", str(N_MSG), *chans)
    await client.get_pubsub_message()
    got = 0
    with Meter() as m:
        while got < N_MSG - 1:
            await client.get_pubsub_message()
            got += 1
    await proc.wait()
    print(f"delivery: {got / m.wall:.0f} msg/s, {m.cpu / got * 1e6:.1f} us CPU/msg")
    await client.close()


asyncio.run(main(len(sys.argv) > 1))
