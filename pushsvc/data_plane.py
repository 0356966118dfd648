"""The data plane's client when it is a Redis Cluster (``PUSHSVC_DATA_CLUSTER``).

Job state, logs, sequences and their channels are the data plane; arq's queue, leases,
turns, start counters and the other keys without a tenant's hash tag are the queue
plane, on ``PUSHSVC_REDIS_URL`` (keys.py says which is which). Without a cluster both
planes are that one Redis and one client.

On a cluster, commands go through redis-py's cluster client, which sends each to the
node that owns its slot and follows slot moves (MOVED, ASK) and failovers. Its
pipelines cannot be transactions, so the reads that must see one moment of a job (its
hash and its output, say) run as MULTI/EXEC on a client of the node that owns their
slot (:func:`transaction`). Pub/sub is the event bus's (events.py: sharded, through
valkey-glide).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.cluster import get_node_name
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from .connections import packed_by_hiredis
from .epoch import RunIdCheck
from .settings import Settings

# What a node answers while a slot moves or a shard fails over (a key it does not hold
# now, a slot half moved, the cluster down), and what redis-py's cluster client raises
# when its own redirects run out (ClusterError "TTL exhausted") or it cannot map the
# slots (RedisClusterException, which is no RedisError): the call did not run. Made
# again for up to _SETTLE_S, then raised as a connection error, which every caller
# treats as Redis being away for now (a worker keeps its writes pending, the API
# answers 503).
_UNSETTLED = (ClusterError, TryAgainError, AskError, RedisClusterException)
# The reply's code: first, or (a pipeline's) after "error: " and maybe "('".
_REDIRECT = re.compile(r"(?:^|error: (?:\(')?)(MOVED|ASK|TRYAGAIN|CLUSTERDOWN) ")
# A read-only script (lua/read.lua, scan.lua) that reads a job key it was not given,
# while the tenant's slot is half moved: it wrote nothing, so it is made again too.
_NON_LOCAL = "non local key"
_SETTLE_S = 5.0
# Set while a task holds a place of DataCluster's gate (the calls it makes take none).
_GATED: contextvars.ContextVar[bool] = contextvars.ContextVar("pushsvc_gated", default=False)


def unsettled(reply: object) -> bool:
    """Is ``reply`` (a pipelined call's) an error after which the call did not run, for
    the cluster was unsettled (batching.py makes it again through :func:`settled`)?"""
    if isinstance(reply, _UNSETTLED):
        return True
    return isinstance(reply, ResponseError) and bool(_REDIRECT.search(str(reply)))


async def settled(call: Callable[[], Awaitable[Any]], *, reads_only: bool = False) -> Any:
    """``call()``, made again while the cluster is unsettled (``_UNSETTLED``, a redirect
    in a transaction's reply; with ``reads_only``, a script's non-local key), for up to
    ``_SETTLE_S``; then a connection error. Never for an error after which the call may
    have run (a connection lost, a timeout): those go to the caller as they are."""
    delay, give_up = 0.05, time.monotonic() + _SETTLE_S
    while True:
        try:
            return await call()
        except _UNSETTLED as exc:
            last: Exception = exc
        except ResponseError as exc:
            if not (_REDIRECT.search(str(exc)) or (reads_only and _NON_LOCAL in str(exc))):
                raise
            last = exc
        if time.monotonic() > give_up:
            raise RedisConnectionError(f"the data cluster did not settle: {last}") from last
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


class DataCluster(RedisCluster):
    """redis-py's cluster client, its connections packed by hiredis and noting their
    node's run id (as connections.make_pool's do: each tenant's epoch is checked against
    the node that holds its slot), with a client per primary for :func:`transaction`.

    redis-py's own retries are off: it would send a call again after a connection error
    or a timeout, when the call may have run (a publish twice). :func:`settled` makes
    again only the calls that did not run. Close it with :meth:`close_all` (redis-py
    calls ``aclose`` itself to reset its map)."""

    # What redis-py makes again itself (its default adds connection errors and timeouts).
    ERRORS_ALLOW_RETRY = (ClusterDownError,)  # type: ignore[assignment]

    def __init__(self, settings: Settings, calls: int | None = None, **kwargs: Any) -> None:
        self._seeds = settings.data_cluster
        # At most ``calls`` commands, pipelines and transactions in flight at once, across
        # the shards (None: no limit): so at most that many connections to a node, each
        # kind (redis-py makes one per overlapping call to a node, and refuses one past
        # a limit rather than waiting for it, so the wait is here).
        self._gate = asyncio.Semaphore(calls) if calls else None
        seeds = [ClusterNode(host, port) for host, port in self._seeds]
        if password := settings.data_cluster_password.get_secret_value():
            kwargs.setdefault("password", password)
            kwargs.setdefault("username", settings.data_cluster_username or None)
        # One try of a pipeline (0 would make none), and no connection-level retries.
        kwargs.setdefault("cluster_error_retry_attempts", 1)
        kwargs.setdefault("connection_error_retry_attempts", 0)
        super().__init__(startup_nodes=seeds, **kwargs)
        self.epoch_check = RunIdCheck()  # epoch.run_id_arg
        context = settings.data_cluster_tls_context()
        self.connection_class = packed_by_hiredis(Connection if context is None else _tls(context))
        nodes = self.nodes_manager
        # The nodes found later are made from these options; the seeds were made already.
        nodes.connection_kwargs["redis_connect_func"] = self.epoch_check.on_connect
        nodes.connection_kwargs["connection_class"] = self.connection_class
        for node in nodes.startup_nodes.values():
            self._fit(node)
        self._options = {
            k: v
            for k, v in kwargs.items()
            if k.startswith("socket_") or k in ("client_name", "username", "password")
        }
        self._by_node: dict[tuple[str, int], Redis] = {}

    def _fit(self, node: ClusterNode) -> ClusterNode:
        node.connection_kwargs["redis_connect_func"] = self.epoch_check.on_connect
        node.connection_class = self.connection_class
        return node

    def _reseed(self) -> None:
        """redis-py drops a node it could not reach from the nodes it starts from (and
        redis-py 5 never adds it back): with none left it could not find the cluster
        again. The configured ones are added back."""
        startup = self.nodes_manager.startup_nodes
        for host, port in self._seeds:
            if get_node_name(host, port) not in startup:
                node = ClusterNode(host, port, **self.nodes_manager.connection_kwargs)
                startup[node.name] = node

    async def gated(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """``call()`` once one of the ``calls`` places is free (its own place, in the
        calls it makes: a pipeline's redirected commands go one by one)."""
        if self._gate is None or _GATED.get():
            return await call()
        try:  # as long as one Redis's blocking pool waits for a connection
            async with asyncio.timeout(_SETTLE_S):
                await self._gate.acquire()
        except TimeoutError:
            raise RedisConnectionError("no data-plane call place came free in 5 s") from None
        token = _GATED.set(True)
        try:
            return await call()
        finally:
            _GATED.reset(token)
            self._gate.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        self._reseed()
        run = super().execute_command
        try:
            return await settled(lambda: self.gated(lambda: run(*args, **kwargs)))
        except AttributeError as exc:
            raise await self.mid_change(exc) from exc

    async def mid_change(self, exc: AttributeError) -> RedisConnectionError:
        """redis-py 5's cluster client can trip on its own map while a shard fails over
        (a node it no longer has: ``'NoneType' object has no attribute 'name'``). The map
        is dropped, to be asked again by the next call, and the caller sees Redis away
        for now (the call may have run, as after a lost connection)."""
        with contextlib.suppress(Exception):
            await self.aclose()
        return RedisConnectionError(f"the data cluster's map was changing: {exc}")

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        self._reseed()
        return SettlingPipeline(self)  # type: ignore[abstract]  # redis-py's typing

    def node_client(self, host: str, port: int) -> Redis:
        """A plain client of one node (for MULTI/EXEC), made on first use."""
        client = self._by_node.get((host, port))
        if client is None:
            pool = ConnectionPool(
                host=host,
                port=port,
                connection_class=self.connection_class,
                redis_connect_func=self.epoch_check.on_connect,
                **self._options,
            )
            client = self._by_node[(host, port)] = Redis.from_pool(pool)
        return client

    async def close_all(self) -> None:
        """Close every connection: the cluster client's and the per-node clients'."""
        clients, self._by_node = list(self._by_node.values()), {}
        for client in clients:
            await client.aclose()
        await self.aclose()


class SettlingPipeline(ClusterPipeline):
    """A cluster pipeline whose failure to map the cluster, or to place its calls while
    it is unsettled, is a connection error (the calls did not run). Calls that came back
    with a redirect or CLUSTERDOWN as their reply (``raise_on_error=False``) are the
    caller's to make again (batching.py does, through the client)."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        client = self._client
        assert isinstance(client, DataCluster)
        run = super().execute
        try:
            return await client.gated(lambda: run(raise_on_error, allow_redirections))
        except _UNSETTLED as exc:
            raise RedisConnectionError(f"the data cluster is unsettled: {exc}") from exc
        except AttributeError as exc:
            raise await client.mid_change(exc) from exc


def _tls(context: ssl.SSLContext) -> type[SSLConnection]:
    """redis-py's TLS connection with ``context``, one for all the client's connections
    (redis-py would build one per connection from file names, each adding the system's
    CAs to the CA file's)."""

    class TlsConnection(SSLConnection):
        def _connection_arguments(self) -> Mapping[str, Any]:
            return {**Connection._connection_arguments(self), "ssl": context}

    return TlsConnection


def connect_data(settings: Settings, calls: int | None = None, **kwargs: Any) -> DataCluster | None:
    """The data plane's own client when it is a cluster (``settings.data_cluster``); None
    when it is the queue's Redis. ``calls``: at most that many in flight (connections
    per node: that many for commands and that many for transactions), as the queue's
    pool of that size bounds them on one Redis; None: made as calls overlap."""
    if not settings.data_cluster:
        return None
    return DataCluster(settings, calls, **kwargs)  # type: ignore[abstract]  # redis-py's typing


async def transaction(redis: Any, key: str, build: Callable[[Pipeline], object]) -> list[Any]:
    """Run the commands ``build`` queues on a pipeline as one MULTI/EXEC; every key they
    touch must be in ``key``'s slot. On a cluster, on the node that owns the slot, again
    on the new owner when the slot moved or its shard failed over (:func:`settled`)."""
    if not isinstance(redis, DataCluster):
        async with redis.pipeline(transaction=True) as pipe:
            build(pipe)
            return await pipe.execute()  # type: ignore[no-any-return]

    async def attempt() -> list[Any]:
        try:
            await redis.initialize()
            node = redis.get_node_from_key(key)
            assert node is not None
            async with redis.node_client(node.host, int(node.port)).pipeline(True) as pipe:
                build(pipe)
                return await pipe.execute()
        except ResponseError as exc:
            if _REDIRECT.search(str(exc)):
                await redis.nodes_manager.initialize()  # the slots' owners, asked again
            raise

    return await settled(lambda: redis.gated(attempt))  # type: ignore[no-any-return]
