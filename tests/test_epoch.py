"""Stream positions (pushsvc/epoch.py): parsing SSE ids, printing them back, comparing
by history, fresh epochs, the store epoch the connect hook takes on a real Redis, and
each tenant's epoch following the Redis it was taken on."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError

from pushsvc import epoch, transitions
from pushsvc.connections import make_pool, packed_by_hiredis
from pushsvc.context import JobContext
from pushsvc.epoch import RUN_ID_MARK, EpochCheck, RunIdCheck, StreamPosition, new_epoch
from pushsvc.keys import Keys
from pushsvc.publish import PublishCall, Published, Writer
from pushsvc.settings import Settings
from pushsvc.store import JobStore

from .conftest import noted_run_id, open_store
from .procs import DurableRedis, RedisServer, SentinelSet, info, wait_until
from .test_store import new_job

T = TypeVar("T")


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
        await pool.aclose()  # a sentinel pool: its sentinels' connections too


async def recorded_run(store: JobStore, tenant: str) -> bool:
    """Is the tenant's epoch taken on the server the store reaches now?"""
    run_id = await noted_run_id(store.redis)
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


async def when_up(call: Callable[[], Awaitable[T]]) -> T:
    """``call``'s answer once the primary the sentinels name takes it (after a failover
    the first calls meet connections to the old one, or none yet)."""
    async with asyncio.timeout(30):
        while True:
            try:
                return await call()
            except (RedisConnectionError, ReadOnlyError):
                await asyncio.sleep(0.1)


@pytest.mark.timeout(120)
async def test_a_server_promoted_again_starts_new_histories_and_the_worker_repairs() -> None:
    """Was (a chaos run of Sentinel failovers, CI): a server promoted again, after it had
    followed the other for a while, keeps its run id. A tenant whose epoch was taken on
    it before looked current there, though a job's start, made on the other server
    meanwhile, was lost in the failover back: the worker's next write found the job
    queued, its repair was refused as if another attempt had taken the job, the attempt
    stopped, and the job waited, queued, for ever. A promotion renews the server's
    replication ID, which the run id pushsvc notes now includes: the tenant starts new
    histories there, and the worker rewrites its job and goes on."""
    sset = SentinelSet().start()
    try:
        async with checked_store(sset.url) as store:
            job = await new_job(store, status="queued")  # the tenant's epoch: taken on X
            first = sset.primary
            await asyncio.to_thread(sset.failover)  # to Y, nothing lost; X follows Y
            await asyncio.to_thread(sset.hold_replication)  # X misses what comes next
            change = transitions.start(job, "owner-1", time.time())
            writer = Writer(job["arq_id"])
            started = await when_up(
                lambda: transitions.publish(store, job["id"], "t", change, writer=writer)
            )
            assert isinstance(started, Published)  # made on Y only
            position = Writer(job["arq_id"], "owner-1", started.position)
            ctx = JobContext(store, job, rate_hz=0.001, writer=position)
            await asyncio.to_thread(sset.failover_losing_writes)  # back to X: the start lost
            assert sset.primary is first
            lost = await when_up(lambda: store.load("t", job["id"]))
            assert lost is not None and lost["status"] == "queued"  # as X last had it
            await ctx.output("abc")
            await when_up(ctx.flush)
            assert not ctx.superseded
            snap = await store.snapshot(job["id"], "t")
            assert snap is not None and (snap.status, snap.output) == ("running", "abc")
            assert snap.epoch != started.position.epoch  # a new history, as a reset
            assert await recorded_run(store, "t")
    finally:
        sset.stop()


@pytest.mark.timeout(60)
async def test_a_connection_notes_its_servers_promotion_before_its_next_publish_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server promoted while a connection to it stays open (CLUSTER FAILOVER keeps
    clients; so does REPLICAOF NO ONE): the connection's next call that carries the run
    id (a publish call) asks again, at most every RENOTE_S, and reconnects with the
    promoted server's. Before its promotion the server's run id is its ``run_id``."""
    primary, replica = RedisServer().start(), RedisServer().start()
    pool = ConnectionPool(
        port=replica.port,
        redis_connect_func=RunIdCheck().on_connect,
        connection_class=packed_by_hiredis(Connection),
    )
    client = Redis(connection_pool=pool)
    monkeypatch.setattr(epoch, "RENOTE_S", 3600.0)  # not asked again until the test says
    try:
        with primary.client() as sync:
            sync.config_set("repl-diskless-sync-delay", 0)  # Redis 7 waits 5 s by default
        with replica.client() as sync:
            sync.replicaof("127.0.0.1", primary.port)
            linked = lambda: info(replica.port, "replication")["master_link_status"] == "up"  # noqa: E731
            wait_until(linked, 20, "the replica following the primary")
            run_id = sync.info("server")["run_id"]
        before = await client.execute_command("ECHO", RUN_ID_MARK)
        assert before == run_id.encode() == (await noted_run_id(client)).encode()
        ident = await client.client_id()
        with replica.client() as sync:
            sync.replicaof("NO", "ONE")  # promoted; the connection stays
        assert await client.execute_command("ECHO", RUN_ID_MARK) == before  # not asked yet
        monkeypatch.setattr(epoch, "RENOTE_S", 0.0)
        after = await client.execute_command("ECHO", RUN_ID_MARK)
        assert after != before and after == (await noted_run_id(client)).encode()
        assert await client.client_id() != ident  # another connection: checked again
    finally:
        await client.aclose()
        await pool.aclose()
        primary.stop()
        replica.stop()
