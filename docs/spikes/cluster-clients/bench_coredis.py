"""coredis: tests 1-3 (subscriptions/conn count, script cost, delivery)."""

import asyncio
import subprocess
import sys

import coredis

from common import LUA, Meter, tcp_detail, tenants_per_shard

N_CALLS, CONC, N_MSG = 5000, 32, 30000


async def script_bench(client, tenants):
    script = client.register_script(LUA)

    async def worker(k):
        for i in range(k, N_CALLS, CONC):
            t = tenants[i % len(tenants)]
            await script(keys=[f"{{{t}}}:job:{i}", f"{{{t}}}:log"], args=["running", f"{{{t}}}:ch:job"])

    await asyncio.gather(*(worker(k) for k in range(CONC)))  # warm-up / load
    with Meter() as m:
        await asyncio.gather(*(worker(k) for k in range(CONC)))
    print(f"script: {N_CALLS / m.wall:.0f} calls/s, {m.cpu / N_CALLS * 1e6:.0f} us CPU/call; conns {tcp_detail()}")


async def conn_count(tenants):
    async with coredis.RedisCluster("127.0.0.1", 7101, decode_responses=True) as client:
        print("fresh client conns", tcp_detail())
        async with client.sharded_pubsub(ignore_subscribe_messages=True) as ps:
            await ps.subscribe(*[f"{{{t}}}:ch:x" for t in tenants])
            print("fresh client + sharded_pubsub on 3 shards conns", tcp_detail())


async def main():
    tenants = tenants_per_shard(2)
    await conn_count(tenants)
    async with coredis.RedisCluster("127.0.0.1", 7101, decode_responses=True) as client:
        print("conns after connect", tcp_detail())
        await script_bench(client, tenants)
        async with client.sharded_pubsub(ignore_subscribe_messages=True) as ps:
            print("conns after pubsub open", tcp_detail())
            chans = [f"{{{t}}}:ch:job{j}" for t in tenants for j in range(5)]
            await ps.subscribe(*chans)
            print("subscribed", len(ps.channels), "conns", tcp_detail())
            await ps.unsubscribe(*chans[:10])
            await ps.subscribe("{t0}:ch:new")
            print("after unsub 10/sub 1:", len(ps.channels), "conns", tcp_detail())
            n = await client.spublish("{t0}:ch:new", "hello")
            msg = None
            while msg is None:
                msg = await asyncio.wait_for(ps.get_message(timeout=2), 3)
            print("dynamic sub delivery", n, msg)
            # delivery: out-of-process publisher
            chans = chans[10:]
            proc = await asyncio.create_subprocess_exec(sys.executable, "publisher.py", str(N_MSG), *chans)
            got = 0
            await ps.__anext__()
            with Meter() as m:
                async for msg in ps:
                    got += 1
                    if got == N_MSG - 1:
                        break
            await proc.wait()
            print(f"delivery: {got / m.wall:.0f} msg/s, {m.cpu / got * 1e6:.1f} us CPU/msg")


asyncio.run(main())
