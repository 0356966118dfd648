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
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection
from redis.exceptions import (
    AskError,
    ClusterError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .connections import packed_by_hiredis
from .epoch import RunIdCheck
from .settings import Settings

# What a node answers for a key it does not hold (now): the map is refreshed and the
# call made again, a little later for a slot being moved or a shard failing over.
_REDIRECTS = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")
_ATTEMPTS = 8
# What redis-py's cluster client raises while a slot moves or a shard fails over, when its
# own redirects run out (ClusterError "TTL exhausted", CLUSTERDOWN, TRYAGAIN): the call
# did not run. Ridden out for up to _SETTLE_S, then raised as a connection error, which
# every caller treats as Redis being away for now (a worker keeps its writes pending,
# the API answers 503).
_UNSETTLED = (ClusterError, TryAgainError, AskError, SlotNotCoveredError)
_SETTLE_S = 5.0


class DataCluster(RedisCluster):
    """redis-py's cluster client, its connections packed by hiredis and noting their
    node's run id (as connections.make_pool's do: each tenant's epoch is checked against
    the node that holds its slot), with a client per primary for :func:`transaction`."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        seeds = [ClusterNode(host, port) for host, port in settings.data_cluster]
        super().__init__(startup_nodes=seeds, **kwargs)
        self.epoch_check = RunIdCheck()  # epoch.run_id_arg
        self.connection_class = packed_by_hiredis(Connection)
        nodes = self.nodes_manager
        # The nodes found later are made from these options; the seeds were made already.
        nodes.connection_kwargs["redis_connect_func"] = self.epoch_check.on_connect
        nodes.connection_kwargs["connection_class"] = self.connection_class
        for node in nodes.startup_nodes.values():
            node.connection_kwargs["redis_connect_func"] = self.epoch_check.on_connect
            node.connection_class = self.connection_class
        self._options = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
        self._by_node: dict[tuple[str, int], Redis] = {}

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        delay, give_up = 0.05, time.monotonic() + _SETTLE_S
        while True:
            try:
                return await super().execute_command(*args, **kwargs)
            except _UNSETTLED as exc:
                if time.monotonic() > give_up:
                    raise RedisConnectionError(f"the data cluster did not settle: {exc}") from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

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

    async def aclose(self) -> None:
        clients, self._by_node = list(self._by_node.values()), {}
        for client in clients:
            await client.aclose()
        await super().aclose()


def connect_data(settings: Settings, **kwargs: Any) -> DataCluster | None:
    """The data plane's own client when it is a cluster (``settings.data_cluster``); None
    when it is the queue's Redis. Connections are made per node as calls overlap
    (redis-py's cluster client refuses a call past a node's limit rather than waiting,
    so none is set)."""
    if not settings.data_cluster:
        return None
    return DataCluster(settings, **kwargs)  # type: ignore[abstract]  # redis-py's typing


async def transaction(redis: Any, key: str, build: Callable[[Pipeline], object]) -> list[Any]:
    """Run the commands ``build`` queues on a pipeline as one MULTI/EXEC; every key they
    touch must be in ``key``'s slot. On a cluster, on the node that owns the slot, again
    on the new owner when the slot moved or its shard failed over."""
    if not isinstance(redis, DataCluster):
        async with redis.pipeline(transaction=True) as pipe:
            build(pipe)
            return await pipe.execute()  # type: ignore[no-any-return]
    delay = 0.05
    for attempt in range(_ATTEMPTS):
        try:
            await redis.initialize()
            node = redis.get_node_from_key(key)
            assert node is not None
            async with redis.node_client(node.host, int(node.port)).pipeline(True) as pipe:
                build(pipe)
                return await pipe.execute()
        except ResponseError as exc:
            if attempt + 1 == _ATTEMPTS or not any(r in str(exc) for r in _REDIRECTS):
                raise
        except (RedisConnectionError, RedisTimeoutError, OSError):
            if attempt + 1 == _ATTEMPTS:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)
        await redis.nodes_manager.initialize()  # the slots' owners, asked again
    raise AssertionError("unreachable")
