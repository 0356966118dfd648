"""How every process connects to Redis: one pool factory, and a check on every new connection.

Each new connection first runs the epoch check (:class:`pushsvc.epoch.EpochCheck`), which
compares the server's run id with the one recorded beside the store's epoch, so that no
command reaches a Redis that restarted, failed over or came back empty before the epoch
says so; and each publish call carries the run id of the server its connection reached
(each tenant's epoch: lua/publish_fn.lua).

``PUSHSVC_REDIS_URL`` may name a Sentinel-managed primary instead of a server::

    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/<primary name>[/<db>]
        [?sentinel_username=...&sentinel_password=...]

The user and password are the primary's; sentinels that require auth take theirs from
the query. Every new connection asks the sentinels where the primary is and is refused
unless the server is one (:func:`primary_only`); a pool also asks again on checkouts
(:class:`SentinelPool`), so a process follows a failover without a restart.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
from redis.asyncio import BlockingConnectionPool, ConnectionPool
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError

from .epoch import NO_RUN_ID, RUN_ID_MARK, EpochCheck, renote
from .settings import Settings

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
_SENTINEL_QUERY = {"sentinel_username", "sentinel_password"}


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``redis+sentinel://`` URL: the sentinels to ask, and for which primary."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> SentinelURL:
        """Raises ValueError, naming what is wrong, for anything but the documented form."""
        parts = urlsplit(url)
        if parts.scheme != SENTINEL_SCHEME:
            raise ValueError(f"not a {SENTINEL_SCHEME}:// URL")
        userinfo, _, hosts = parts.netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        path = [unquote(p) for p in parts.path.split("/") if p]
        if not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError(f"{SENTINEL_SCHEME}:// URLs end in /<primary name>[/<db>]")
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        if unknown := set(query) - _SENTINEL_QUERY:
            raise ValueError(f"unknown {SENTINEL_SCHEME}:// options: {sorted(unknown)}")
        return cls(
            sentinels=tuple(_host_port(h) for h in hosts.split(",")),
            service=path[0],
            db=int(path[1]) if len(path) == 2 else 0,
            username=unquote(user) or None,
            password=unquote(password) or None,
            sentinel_username=query.get("sentinel_username") or None,
            sentinel_password=query.get("sentinel_password") or None,
        )

    def primary_kwargs(self) -> dict[str, Any]:
        """Connection options for the primary (and nothing for the sentinels)."""
        return {"db": self.db, "username": self.username, "password": self.password}

    def sentinel_kwargs(self) -> dict[str, Any]:
        return {"username": self.sentinel_username, "password": self.sentinel_password}


def is_sentinel_url(url: str) -> bool:
    return url.startswith(f"{SENTINEL_SCHEME}://")


def _host_port(text: str) -> tuple[str, int]:
    host, port = text, ""
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif ":" in text:
        host, _, port = text.rpartition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"bad sentinel address {text!r} (host[:port])")
    return unquote(host), int(port) if port else SENTINEL_PORT


class SentinelPool(SentinelConnectionPool):
    """Connections to the server the sentinels name as the primary.

    redis-py asks the sentinels only when it opens a connection, and after a planned
    failover the old primary goes on serving the connections it has until Sentinel
    demotes it (seconds later: BENCHMARKS.md): writes made there are then lost. So a checkout also
    asks again, at most every ``recheck_s``, and never hands out a connection to
    another server than the one last named. Closing the pool closes its connections
    to the sentinels too.
    """

    recheck_s = 1.0

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self._asked_at = time.monotonic()  # when the sentinels were last asked

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        conn = await super().get_connection(*args, **kwargs)
        try:
            await self._follow_primary(conn)
        except BaseException:
            await self.release(conn)
            raise
        return conn

    async def _follow_primary(self, conn: Any) -> None:
        if time.monotonic() - self._asked_at >= self.recheck_s:
            self._asked_at = time.monotonic()
            # Notes the address and drops idle connections elsewhere; when no sentinel
            # answers, the connections that work are kept.
            with contextlib.suppress(RedisConnectionError):
                await self.get_master_address()  # type: ignore[no-untyped-call]
        if self.master_address is not None and (conn.host, conn.port) != self.master_address:
            await conn.disconnect()
            await self.ensure_connection(conn)

    async def aclose(self) -> None:
        await super().aclose()
        for sentinel in self.sentinel_manager.sentinels:
            await sentinel.aclose()


class BlockingSentinelPool(SentinelPool, BlockingConnectionPool):
    """A :class:`SentinelPool` of fixed size: BlockingConnectionPool's ``get_connection``
    (wait up to ``timeout`` for a free connection) under the sentinel-managed connections."""


def make_pool(
    settings: Settings, max_connections: int | None = None, **kwargs: Any
) -> ConnectionPool:
    """A lazily connecting pool for ``settings.redis_url``.

    With ``max_connections`` the pool is a blocking one: commands wait for a free
    connection, so a process's Redis connections stay fixed however busy it is.
    """
    check = EpochCheck(settings.namespace)
    kwargs["redis_connect_func"] = check.on_connect
    pool: ConnectionPool
    if is_sentinel_url(settings.redis_url):
        kwargs["redis_connect_func"] = primary_only(kwargs["redis_connect_func"])
        pool = _sentinel_pool(SentinelURL.parse(settings.redis_url), max_connections, kwargs)
    elif max_connections is None:
        pool = ConnectionPool.from_url(settings.redis_url, **kwargs)
    else:
        pool = BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=max_connections, timeout=5, **kwargs
        )
    pool.connection_class = packed_by_hiredis(pool.connection_class)
    pool.epoch_check = check  # type: ignore[attr-defined]  # epoch.run_id_arg
    return pool


class HiredisPacking:
    """Commands laid out by hiredis, in C: redis-py's asyncio connection does it in
    Python, argument by argument, about 12 % of a busy worker's CPU (a publish call has
    some 60 arguments; BENCHMARKS.md). What hiredis refuses (a bool, None, another
    type), and a command name of several words, go redis-py's way, with its errors."""

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        if not (isinstance(name, str) and " " in name) and not (
            isinstance(name, bytes) and b" " in name
        ):
            try:
                return [hiredis.pack_command(args)]
            except (TypeError, UnicodeError):
                pass
        return super().pack_command(*args)  # type: ignore[misc, no-any-return]

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        """Connect (and check) first, then send: the run id this connection's server
        has goes where the command holds ``epoch.RUN_ID_MARK``."""
        if not self.is_connected:  # type: ignore[attr-defined]
            await self.connect()  # type: ignore[attr-defined]
        elif check_health:
            await self.check_health()  # type: ignore[attr-defined]
        parts: list[bytes] = []
        if isinstance(command, bytes):
            marked = RUN_ID_MARK in command
        elif isinstance(command, str):
            marked = False
        else:
            command = parts = list(command)  # an iterator given is read once, here
            marked = any(RUN_ID_MARK in part for part in parts)
        if marked:
            if not await renote(self):  # its server was promoted since it connected
                await self.disconnect()  # type: ignore[attr-defined]
                await self.connect()  # type: ignore[attr-defined]
            run_id = getattr(self, "pushsvc_run_id", NO_RUN_ID)
            if isinstance(command, bytes):
                command = command.replace(RUN_ID_MARK, run_id)
            else:
                command = [part.replace(RUN_ID_MARK, run_id) for part in parts]
        await super().send_packed_command(command, check_health=False)  # type: ignore[misc]


def packed_by_hiredis(cls: type[Any]) -> type[Any]:
    """``cls`` (a redis-py asyncio connection class), its commands packed by hiredis."""
    if issubclass(cls, HiredisPacking):
        return cls
    return type(f"Hiredis{cls.__name__}", (HiredisPacking, cls), {})


def primary_only(hook: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
    """``hook``, then refuse the connection unless the server is a primary.

    For about a second after a failover the sentinels still name the old primary; once
    demoted it is a replica that answers reads from what it last had (and may pass the
    epoch check, which writes only when the recorded run id is not its own; when it
    writes, READONLY fails it as Redis unavailable too). A connection made there would
    serve stale reads until its first write failed, so it is refused: the caller sees
    Redis unavailable (503, retry) until the sentinels name the new primary.
    """

    async def on_connect(conn: Any) -> None:
        await hook(conn)
        await conn.send_command("ROLE")
        role = await conn.read_response()
        if role[0] not in (b"master", "master"):
            raise RedisConnectionError(f"{conn.host}:{conn.port} is not the primary (now)")

    return on_connect


def _sentinel_pool(
    url: SentinelURL, max_connections: int | None, kwargs: dict[str, Any]
) -> SentinelPool:
    # The sentinels get the socket timeouts, never the epoch hook (they have no keys).
    timeouts = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
    manager = Sentinel(  # type: ignore[no-untyped-call]
        url.sentinels, sentinel_kwargs={**timeouts, **url.sentinel_kwargs()}
    )
    kwargs.update(url.primary_kwargs())
    if max_connections is None:
        return SentinelPool(url.service, manager, **kwargs)
    return BlockingSentinelPool(
        url.service, manager, max_connections=max_connections, timeout=5, **kwargs
    )


async def primary_moved(pool: ConnectionPool, conn: Any) -> bool:
    """Do the sentinels of ``pool`` name another primary than the server ``conn`` is on?

    For a connection held outside the pool's checkouts (the event bus's pub/sub): after
    a planned failover the old primary keeps it open until Sentinel demotes it.
    """
    if not isinstance(pool, SentinelPool) or conn is None:
        return False
    try:
        address = await pool.get_master_address()  # type: ignore[no-untyped-call]
    except RedisConnectionError:
        return False  # no sentinel answers: keep what works
    return (conn.host, conn.port) != tuple(address)
