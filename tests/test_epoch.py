"""Stream positions (pushsvc/epoch.py): parsing SSE ids, printing them back, comparing
by history, fresh epochs, the store epoch the connect hook takes on a real Redis, and
each tenant's epoch following the Redis it was taken on."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from pushsvc.connections import make_pool
from pushsvc.epoch import EpochCheck, StreamPosition, new_epoch
from pushsvc.keys import Keys
from pushsvc.publish import PublishCall, Published
from pushsvc.settings import Settings
from pushsvc.store import JobStore

from .conftest import open_store
from .procs import DurableRedis, RedisServer


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[JobStore]:
    async with open_store(redis_server) as opened:
        yield opened


@pytest.mark.timeout(10)
def test_a_position_parses_and_prints_back() -> None:
    assert StreamPosition.parse("12.ab12cd34") == StreamPosition(12, "ab12cd34")
    assert StreamPosition.parse("7") == StreamPosition(7, "")
    assert str(StreamPosition(12, "ab12cd34")) == "12.ab12cd34"
    assert str(StreamPosition(7)) == "7"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("raw", ["", "-1", "1.", "a.1", "1.ab-cd", "²", "３", "1 ", "1" * 19])
def test_anything_else_is_not_a_position(raw: str) -> None:
    assert StreamPosition.parse(raw) is None


@pytest.mark.timeout(10)
def test_only_a_position_of_the_same_epoch_or_none_compares_by_number() -> None:
    assert StreamPosition(3, "aaaa").same_history("aaaa")
    assert not StreamPosition(3, "aaaa").same_history("bbbb")
    assert StreamPosition(3).same_history("bbbb")  # an older client's plain integer id


@pytest.mark.timeout(10)
def test_new_epochs_are_short_hex_and_distinct() -> None:
    epochs = {new_epoch() for _ in range(1000)}
    assert len(epochs) == 1000
    assert all(len(e) == 8 and int(e, 16) >= 0 for e in epochs)


@pytest.mark.timeout(20)
async def test_connections_of_one_server_share_the_store_epoch(redis_server: RedisServer) -> None:
    namespace = f"e{secrets.token_hex(3)}"
    hook = EpochCheck(namespace).on_connect
    seen = []
    for _ in range(2):
        client = Redis.from_url(redis_server.url, redis_connect_func=hook)
        await client.ping()
        seen.append(await client.hget(Keys(namespace).epoch, "id"))
        await client.aclose()
    assert seen[0] is not None and seen[0] == seen[1]


JOB = {"id": "j1", "type": "ticker", "status": "queued", "payload": {}, "attempt": 1}
JOB |= {"max_attempts": 1, "run": 1, "arq_id": "j1.a", "created_at": 1.0, "output": ""}


@contextlib.asynccontextmanager
async def checked_store(url: str) -> AsyncIterator[JobStore]:
    """A store on a pool as processes make it (make_pool: the epoch check)."""
    settings = Settings(redis_url=url, namespace=f"e{secrets.token_hex(3)}")
    pool = make_pool(settings)
    client = Redis(connection_pool=pool)
    try:
        yield JobStore(client, settings)
    finally:
        await client.aclose()
        await pool.disconnect()


async def recorded_run(store: JobStore, tenant: str) -> bool:
    """Is the tenant's epoch taken on the server the store reaches now?"""
    run_id = (await store.redis.info("server"))["run_id"]
    return bool(await store.redis.hget(store.keys.tenant_epoch(tenant), "run") == run_id.encode())


@pytest.mark.timeout(20)
async def test_a_tenants_epoch_follows_the_redis_it_was_taken_on(store: JobStore) -> None:
    """Each tenant keeps the store's epoch as its slot knows it, with the Redis run id it
    was taken on: a caller whose connection check found another run id (a restart, a
    failover of the shard that holds the slot) starts new histories, for that tenant;
    another tenant's stay until its own next write there."""

    async def publish(tenant: str, run_id: str) -> str:
        call = PublishCall("j1", tenant, "progress", {"progress": 1}, {"progress": 1})
        keys, args = call.layout(store.keys, store.settings, run_id)
        reply = store._reply(await store._publish(keys=keys, args=args))
        assert isinstance(reply, Published)
        return reply.epoch

    for tenant in ("a", "b"):
        await store.create(tenant, {**JOB, "tenant": tenant}, None)
    first = {t: await publish(t, "run-1") for t in ("a", "b")}
    assert await publish("a", "run-1") == first["a"]  # the same Redis: the same history
    moved = await publish("a", "run-2")
    assert moved != first["a"] and await publish("a", "run-2") == moved
    assert await store.redis.hget(store.keys.tenant_epoch("b"), "run") == b"run-1"
    assert await publish("b", "") == first["b"]  # no check: the epoch it has stands


@pytest.mark.timeout(20)
async def test_a_new_processs_first_write_records_the_run_id(redis_server: RedisServer) -> None:
    """Was: a process's first call, made before its pool had connected, carried no run
    id; the tenant's epoch was taken on "no run", and the next call (with the run id)
    took another: the job a worker had just started looked rewound to it."""
    async with checked_store(redis_server.url) as store:
        await store.create("a", {**JOB, "tenant": "a"}, None)  # the process's first call
        assert await recorded_run(store, "a")


@pytest.mark.timeout(60)
async def test_the_first_call_after_a_restart_carries_the_new_servers_run_id() -> None:
    """Was (review): a call laid out with the run id its pool last found, and sent through
    a connection that reconnected to a restarted server (its data back from disk), kept
    the tenant's old epoch: its event counted in the old history. The run id is now the
    sending connection's, put in place once it has connected."""
    server = DurableRedis().start()
    try:
        async with checked_store(server.url) as store:
            await store.create("a", {**JOB, "tenant": "a"}, None)
            first = await store.publish("j1", "a", "progress", {"progress": 1}, {"progress": 1})
            assert isinstance(first, Published)
            server.restart()  # the pool's connection is gone; the data is back
            for _ in range(3):  # the first command may meet the dead connection
                with contextlib.suppress(RedisConnectionError):
                    second = await store.publish("j1", "a", "progress", {"progress": 2})
                    break
            assert isinstance(second, Published) and second.seq == first.seq + 1
            assert second.epoch != first.epoch  # another server: another history
            assert await recorded_run(store, "a")
    finally:
        server.shutdown()
