"""Tests 4 (slot move) and 5 (failover) for `coredis` or `glide` (argv[1])."""

import asyncio
import contextlib
import sys
import time

from redis.crc import key_slot

import cluster_ops as ops
from common import LUA

T0 = time.monotonic()
got: list[tuple[float, str, str]] = []


def log(*a):
    print(f"[{time.monotonic() - T0:7.2f}]", *a, flush=True)


def pick_tenant(prefix: str, port: int) -> str:
    i = 0
    while ops.owner_port(key_slot(f"{{{prefix}{i}}}".encode())) != port:
        i += 1
    return f"{prefix}{i}"


class CoredisAdapter:
    async def __aenter__(self):
        import coredis
        self.stack = contextlib.AsyncExitStack()
        self.c = await self.stack.enter_async_context(coredis.RedisCluster("127.0.0.1", 7101, decode_responses=True))
        self.ps = await self.stack.enter_async_context(self.c.sharded_pubsub())
        self.script = self.c.register_script(LUA)
        return self

    async def __aexit__(self, *a):
        await self.stack.aclose()  # anyio scopes: must exit in the entering task

    async def sub(self, ch):
        await self.ps.subscribe(ch)

    async def recv(self):
        while True:
            m = await self.ps.get_message(timeout=1)
            if m is not None:
                return m["type"], m["channel"], str(m["data"])

    async def call(self, t):
        return await self.script(keys=[f"{{{t}}}:job:1", f"{{{t}}}:log"], args=["x", f"{{{t}}}:ch"])


class GlideAdapter:
    async def __aenter__(self):
        from glide import GlideClusterClient, GlideClusterClientConfiguration, NodeAddress, Script
        self.c = await GlideClusterClient.create(GlideClusterClientConfiguration([NodeAddress("127.0.0.1", 7101)]))
        self.script = Script(LUA)
        return self

    async def __aexit__(self, *a):
        await self.c.close()

    async def sub(self, ch):
        await self.c.ssubscribe({ch}, timeout_ms=3000)

    async def recv(self):
        m = await self.c.get_pubsub_message()
        return "message", m.channel.decode(), m.message.decode()

    async def call(self, t):
        return await self.c.invoke_script(self.script, keys=[f"{{{t}}}:job:1", f"{{{t}}}:log"], args=["x", f"{{{t}}}:ch"])


async def receiver(cl):
    while True:
        try:
            typ, ch, data = await cl.recv()
        except Exception as e:  # noqa: BLE001
            log("recv error", type(e).__name__, e)
            await asyncio.sleep(0.5)
            continue
        got.append((time.monotonic(), ch, data))
        log("RECV", typ, ch, data)


def received(data: str) -> bool:
    return any(d == data for _, _, d in got)


async def publish_until(ch, tag, secs, step=0.2):
    end = time.monotonic() + secs
    i = 0
    while time.monotonic() < end:
        try:
            await asyncio.to_thread(ops.spublish, ch, f"{tag}{i}")
        except Exception as e:  # noqa: BLE001
            log("publish error", type(e).__name__, e)
        await asyncio.sleep(step)
        if any(d.startswith(tag) for _, _, d in got):
            return True
        i += 1
    return False


async def slot_move(cl, name):
    t = pick_tenant(f"m{name}", ops.owner_port(100))
    ch = f"{{{t}}}:ch"
    await cl.sub(ch)
    await asyncio.to_thread(ops.spublish, ch, "pre-move")
    await asyncio.sleep(0.3)
    log("pre-move received:", received("pre-move"))
    src = await asyncio.to_thread(ops.migrate_slot, key_slot(ch.encode()), ops.owner_port(16000))
    log(f"moved slot {key_slot(ch.encode())} of {ch} {src} -> {ops.owner_port(16000)}")
    ok = await publish_until(ch, "post-move-", 6)
    log("post-move received without app action:", ok, "SHARDNUMSUB on new owner:", ops.shardnumsub(ch))
    if not ok:
        try:
            await asyncio.wait_for(cl.sub(ch), 5)
            log("app resubscribed; SHARDNUMSUB", ops.shardnumsub(ch))
        except Exception as e:  # noqa: BLE001
            log("app resubscribe failed", type(e).__name__, e)
        log("after app resubscribe received:", await publish_until(ch, "resub-", 4))
    with contextlib.suppress(Exception):
        log("script call after move:", await asyncio.wait_for(cl.call(t), 3))
    if not received("resub-0"):
        try:
            await asyncio.wait_for(cl.sub(ch), 5)
            log("app resubscribed after script call; SHARDNUMSUB", ops.shardnumsub(ch))
        except Exception as e:  # noqa: BLE001
            log("2nd app resubscribe failed", type(e).__name__, e)
        log("after 2nd resubscribe received:", await publish_until(ch, "resub2-", 4))


async def failover(cl, name):
    t = pick_tenant(f"f{name}", ops.owner_port(8000))
    ch = f"{{{t}}}:ch"
    await cl.sub(ch)
    await asyncio.to_thread(ops.spublish, ch, "pre-fail")
    await asyncio.sleep(0.3)
    log("pre-fail received:", received("pre-fail"))
    port = ops.owner_port(key_slot(ch.encode()))
    ops.kill9(port)
    k = time.monotonic()
    log(f"killed {port}")
    promoted = script_ok = None
    errors: dict[str, int] = {}
    i = 0
    while time.monotonic() - k < 40 and not (script_ok and any(d.startswith("fo-") for _, _, d in got)):
        if promoted is None:
            with contextlib.suppress(Exception):
                if await asyncio.to_thread(ops.owner_port, key_slot(ch.encode())) != port:
                    promoted = time.monotonic() - k
                    log(f"promoted after {promoted:.2f}s")
        if not script_ok:
            try:
                await asyncio.wait_for(cl.call(t), 2)
                script_ok = time.monotonic() - k
                log(f"script ok after {script_ok:.2f}s")
            except Exception as e:  # noqa: BLE001
                key = f"{type(e).__name__}: {str(e)[:120]}"
                if key not in errors:
                    log("script error:", key)
                errors[key] = errors.get(key, 0) + 1
        if promoted is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(ops.spublish, ch, f"fo-{i}")
        i += 1
        await asyncio.sleep(0.1)
    first = next((ts - k for ts, _, d in got if d.startswith("fo-")), None)
    log(f"SUMMARY failover: promoted {promoted}, script ok {script_ok}, first msg after kill {first}, errors {errors}")
    if first is None:
        log("SHARDNUMSUB on new owner:", ops.shardnumsub(ch))
    return port


async def main(name):
    adapter = {"coredis": CoredisAdapter, "glide": GlideAdapter}[name]()
    async with adapter as cl:
        rt = asyncio.create_task(receiver(cl))
        await slot_move(cl, name)
        port = await failover(cl, name)
        rt.cancel()
    ops.restart(port)
    await asyncio.to_thread(ops.wait_stable, 30)
    log("restarted", port, "cluster stable")


asyncio.run(main(sys.argv[1]))
