"""Baseline: redis-py 5 asyncio, same script against standalone redis-server :7200."""

import asyncio

import redis.asyncio as redis

from common import LUA, Meter

N_CALLS, CONC = 5000, 32


async def main():
    r = redis.Redis(port=7200, decode_responses=True)
    script = r.register_script(LUA)
    tenants = [f"t{i}" for i in range(6)]

    async def worker(k):
        for i in range(k, N_CALLS, CONC):
            t = tenants[i % len(tenants)]
            await script(keys=[f"{{{t}}}:job:{i}", f"{{{t}}}:log"], args=["running", f"{{{t}}}:ch:job"])

    await asyncio.gather(*(worker(k) for k in range(CONC)))
    with Meter() as m:
        await asyncio.gather(*(worker(k) for k in range(CONC)))
    print(f"redis-py standalone script: {N_CALLS / m.wall:.0f} calls/s, {m.cpu / N_CALLS * 1e6:.0f} us CPU/call")
    # delivery baseline: plain pubsub on standalone
    ps = r.pubsub(ignore_subscribe_messages=True)
    await ps.ssubscribe(*[f"{{t{i}}}:ch" for i in range(20)]) if hasattr(ps, "ssubscribe") else None
    await r.aclose()


asyncio.run(main())
