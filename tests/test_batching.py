"""batching.py: script calls of one turn of the event loop in one pipeline, against a real
Redis (and one that goes away)."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from redis.asyncio import ConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError

from pushsvc.batching import ScriptBatch

from .procs import RedisServer

ECHO = """
if ARGV[1] == 'bad' then return redis.error_reply('bad input') end
redis.call('INCR', KEYS[1])
return {KEYS[1], ARGV[1]}
"""


def client(url: str, name: str) -> Redis:
    redis = Redis(connection_pool=ConnectionPool.from_url(url, client_name=name))
    redis.auto_close_connection_pool = True
    return redis


async def named_clients(redis: Redis, name: str) -> int:
    return sum(c.get("name") == name for c in await redis.client_list())


async def test_calls_of_one_turn_share_a_round_trip_and_keep_their_own_replies(
    redis_server: RedisServer,
) -> None:
    name = f"batch-{secrets.token_hex(3)}"
    redis = client(redis_server.url, name)
    try:
        batch = ScriptBatch(redis, redis.register_script(ECHO))
        key = f"t:{secrets.token_hex(4)}"
        async with asyncio.timeout(10):
            calls = [batch([key], [str(i)]) for i in range(50)] + [batch([key], ["bad"])]
            replies = await asyncio.gather(*calls, return_exceptions=True)
        assert replies[:50] == [[key.encode(), str(i).encode()] for i in range(50)]
        assert isinstance(replies[50], ResponseError) and "bad input" in str(replies[50])
        assert int(await redis.get(key) or 0) == 50  # each call ran once
        # One connection carried all 51 calls: made one at a time, they would need 51.
        assert await named_clients(redis, name) == 1
    finally:
        await redis.aclose()


async def test_a_call_that_cannot_be_sent_fails_alone(redis_server: RedisServer) -> None:
    """Packing a batch stops at an argument no encoder takes, before anything is written:
    the others of its batch still go, each on its own."""
    redis = client(redis_server.url, "batch-unsendable")
    try:
        batch = ScriptBatch(redis, redis.register_script(ECHO))
        key = f"t:{secrets.token_hex(4)}"
        async with asyncio.timeout(10):
            replies = await asyncio.gather(
                batch([key], ["a"]),
                batch([key], ["\ud83d"]),  # a lone surrogate: not UTF-8
                batch([key], [None]),  # redis-py refuses None
                batch([key], ["b"]),
                return_exceptions=True,
            )
        assert replies[0] == [key.encode(), b"a"] and replies[3] == [key.encode(), b"b"]
        assert isinstance(replies[1], UnicodeError) and isinstance(replies[2], DataError)
        assert int(await redis.get(key) or 0) == 2
    finally:
        await redis.aclose()


async def test_a_redis_that_lost_its_scripts_gets_them_again(redis_server: RedisServer) -> None:
    redis = client(redis_server.url, "batch-flushed")
    try:
        batch = ScriptBatch(redis, redis.register_script(ECHO))
        key = f"t:{secrets.token_hex(4)}"
        async with asyncio.timeout(10):
            assert await batch([key], ["a"]) == [key.encode(), b"a"]
            await redis.script_flush()  # what a restart without data does to scripts
            replies = await asyncio.gather(*(batch([key], [str(i)]) for i in range(5)))
        assert replies == [[key.encode(), str(i).encode()] for i in range(5)]
        assert int(await redis.get(key) or 0) == 6
    finally:
        await redis.aclose()


async def test_every_call_of_a_batch_fails_when_redis_is_gone() -> None:
    from .procs import free_port

    redis = client(f"redis://127.0.0.1:{free_port()}/0", "batch-gone")
    try:
        batch = ScriptBatch(redis, redis.register_script(ECHO))
        async with asyncio.timeout(10):
            replies = await asyncio.gather(
                *(batch(["k"], [str(i)]) for i in range(3)), return_exceptions=True
            )
        assert all(isinstance(r, RedisConnectionError) for r in replies), replies
    finally:
        await redis.aclose()


async def test_a_caller_that_stops_waiting_leaves_the_others_their_replies(
    redis_server: RedisServer,
) -> None:
    redis = client(redis_server.url, "batch-cancel")
    try:
        batch = ScriptBatch(redis, redis.register_script(ECHO))
        key = f"t:{secrets.token_hex(4)}"
        async with asyncio.timeout(10):
            gone = asyncio.ensure_future(batch([key], ["gone"]))
            kept = asyncio.ensure_future(batch([key], ["kept"]))
            await asyncio.sleep(0)  # both calls are made
            gone.cancel()
            assert await kept == [key.encode(), b"kept"]
        with pytest.raises(asyncio.CancelledError):
            await gone
    finally:
        await redis.aclose()
