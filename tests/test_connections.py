"""connections.py: the redis+sentinel:// URL, and pools on a Sentinel-managed primary."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError

from pushsvc.connections import HiredisPacking, SentinelURL, make_pool, primary_only
from pushsvc.epoch import EpochCheck, server_run_id
from pushsvc.keys import Keys
from pushsvc.settings import Settings
from pushsvc.tools.dev import redis_answers

from .procs import RedisServer, SentinelSet, free_port, info


@pytest.mark.parametrize(
    "args",
    [
        ("EVALSHA", "ab" * 20, 2, "k1", "k2", 86400, -3, 0.1, 1e20, 2.5, "", b"raw\r\n"),
        ("HSET", "k", "f", "é✓ text", "n", 12345678901234567890),
        ("CONFIG GET", "maxmemory"),  # a name of two words: redis-py's way
        (b"SCRIPT LOAD", "return 1"),
        ("SET", "k", memoryview(b"view")),
    ],
)
def test_hiredis_packs_what_redis_py_packs(args: tuple[Any, ...]) -> None:
    ours = make_pool(Settings(redis_url="redis://127.0.0.1:1/0")).connection_class()
    assert isinstance(ours, HiredisPacking)
    assert b"".join(ours.pack_command(*args)) == b"".join(Connection().pack_command(*args))


def test_what_hiredis_refuses_gets_redis_py_s_error() -> None:
    ours = make_pool(Settings(redis_url="redis://127.0.0.1:1/0")).connection_class()
    for bad in (True, None, object()):
        with pytest.raises(DataError):
            ours.pack_command("SET", "k", bad)


async def test_commands_packed_by_hiredis_round_trip(redis_server: RedisServer) -> None:
    client = Redis(connection_pool=make_pool(Settings(redis_url=redis_server.url)))
    client.auto_close_connection_pool = True  # the client owns its pool: closed with it
    key = f"t:{secrets.token_hex(4)}"
    try:
        async with client.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"f": 0.1, "u": "é✓", "b": b"\x00\xff", "n": -7})
            pipe.hgetall(key)
            _, got = await pipe.execute()
        assert got == {b"f": b"0.1", b"u": "é✓".encode(), b"b": b"\x00\xff", b"n": b"-7"}
        assert await client.eval("return ARGV[1] .. ARGV[2]", 0, "a", 2.5) == b"a2.5"
    finally:
        await client.delete(key)
        await client.aclose()


def test_sentinel_url_names_sentinels_primary_db_and_auth() -> None:
    url = SentinelURL.parse(
        "redis+sentinel://app:s%40cret@10.0.0.1:26380,sentinel-b,[::1]:5000/cache/3"
        "?sentinel_password=sp"
    )
    assert url.sentinels == (("10.0.0.1", 26380), ("sentinel-b", 26379), ("::1", 5000))
    assert url.service == "cache"
    assert url.primary_kwargs() == {"db": 3, "username": "app", "password": "s@cret"}
    assert url.sentinel_kwargs() == {"username": None, "password": "sp"}
    assert "s@cret" not in repr(url) and "sp" not in repr(url)
    assert SentinelURL.parse("redis+sentinel://h/m").primary_kwargs()["db"] == 0


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:26379/m",  # another scheme
        "redis+sentinel://h:26379",  # no primary name
        "redis+sentinel://h:26379/m/x",  # db not a number
        "redis+sentinel://h:26379/m/0/extra",
        "redis+sentinel://h:port/m",
        "redis+sentinel://h1,,h2/m",  # an empty address
        "redis+sentinel://h/m?socket_timeout=1",  # an option we would silently ignore
    ],
)
def test_sentinel_url_refuses_what_it_would_misread(url: str) -> None:
    with pytest.raises(ValueError):
        SentinelURL.parse(url)


@pytest.fixture(scope="module")
def sentinels() -> Iterator[SentinelSet]:
    """A Sentinel-managed primary that never fails over (these tests only connect)."""
    sset = SentinelSet().start()
    yield sset
    sset.stop()


@pytest.mark.timeout(30)
async def test_sentinel_pool_is_fixed_size(sentinels: SentinelSet) -> None:
    """The API's pool must stay at ``max_connections``: callers wait, never fail or grow."""
    ns = f"c{secrets.token_hex(3)}"
    name = f"pool-{ns}"
    pool = make_pool(Settings(redis_url=sentinels.url, namespace=ns), 2, client_name=name)
    client = Redis(connection_pool=pool)
    try:
        # Five commands at once, each holding its connection for 0.2 s.
        waits = [client.execute_command("BLPOP", f"{ns}:nothing", 0.2) for _ in range(5)]
        assert await asyncio.gather(*waits) == [None] * 5
        with redis.Redis(port=sentinels.primary.port) as primary:
            mine = [c for c in primary.client_list() if c["name"] == name]
        assert len(mine) == 2, mine
    finally:
        await pool.aclose()


@pytest.mark.timeout(30)
async def test_sentinel_managed_connections_run_the_epoch_check(sentinels: SentinelSet) -> None:
    """The epoch check (pushsvc.epoch) must run on connections to the primary the
    sentinels name, as on any other: it records the run id it was taken on."""
    ns = f"c{secrets.token_hex(3)}"
    pool = make_pool(Settings(redis_url=sentinels.url, namespace=ns))
    client = Redis(connection_pool=pool)
    try:
        await client.ping()
    finally:
        await pool.aclose()
    with redis.Redis(port=sentinels.primary.port) as primary:
        epoch = primary.hgetall(Keys(ns).epoch)
        server, replication = primary.info("server"), primary.info("replication")
    run_id = server_run_id(
        server["run_id"], replication["master_replid"], replication["second_repl_offset"] >= 0
    )
    assert epoch[b"run"].decode() == run_id, epoch


@pytest.mark.timeout(30)
async def test_a_connection_to_a_replica_is_refused(sentinels: SentinelSet) -> None:
    """For about a second after a failover the sentinels still name the old primary,
    demoted to a replica; its run id unchanged, the epoch check passes there without a
    write. Connections made there must be refused (Redis unavailable), not serve stale
    reads until their first write fails."""
    assert sentinels.replica is not None

    async def handshake(conn: Any) -> None:  # the epoch check's part that passes anywhere
        await conn.on_connect()

    for port, refused in ((sentinels.replica.port, True), (sentinels.primary.port, False)):
        pool = ConnectionPool(port=port, redis_connect_func=primary_only(handshake))
        try:
            if refused:
                with pytest.raises(RedisConnectionError, match="not the primary"):
                    await Redis(connection_pool=pool).ping()
            else:
                assert await Redis(connection_pool=pool).ping()
        finally:
            await pool.aclose()


@pytest.mark.timeout(30)
async def test_the_epoch_check_on_a_replica_is_a_connection_error(sentinels: SentinelSet) -> None:
    """A replica refuses the epoch check's write (READONLY): that is Redis unavailable
    for the caller (retried: a worker hands its delivery back), not an error answer."""
    sentinels.wait_healthy()  # a starved primary may have been failed over meanwhile
    assert sentinels.replica is not None and sentinels.replica.role() == "slave"
    check = EpochCheck(f"c{secrets.token_hex(3)}")
    pool = ConnectionPool(port=sentinels.replica.port, redis_connect_func=check.on_connect)
    try:
        with pytest.raises(RedisConnectionError, match="not the primary"):
            await Redis(connection_pool=pool).ping()
    finally:
        await pool.aclose()


@pytest.mark.timeout(30)
async def test_unknown_primary_is_a_connection_error(sentinels: SentinelSet) -> None:
    """A name no sentinel knows must look like Redis being down (503), not a crash."""
    url = sentinels.url.replace(f"/{sentinels.service}/", "/nosuch/")
    pool = make_pool(Settings(redis_url=url), socket_connect_timeout=1)
    client = Redis(connection_pool=pool)
    try:
        with pytest.raises(RedisConnectionError):
            await client.ping()
    finally:
        await pool.aclose()


@pytest.mark.timeout(30)
def test_dev_asks_the_sentinels(sentinels: SentinelSet) -> None:
    """``pushsvc dev`` must use a Sentinel-managed Redis that answers (not start Valkey)."""
    assert info(sentinels.primary.port, "replication")["role"] == "master"
    assert redis_answers(sentinels.url)
    assert not redis_answers(f"redis+sentinel://127.0.0.1:{free_port()}/{sentinels.service}")
