"""A Sentinel-managed Redis on this machine, for the chaos run and the tests.

:class:`SentinelSet`: two redis-servers (one the primary, the other its replica) and
three sentinels (quorum 2, down after 3 s) on free ports, from Debian's
``redis-server`` (a sentinel is ``redis-server <conf> --sentinel``). Clients use
:attr:`SentinelSet.url` (``redis+sentinel://...``).

Each server sits behind a proxy (:class:`proxy.Proxies`, one child process for both): the
sentinels, the clients and the other server reach it only there, and it announces its
proxy's address as its own, so the sentinels monitor, name and reconfigure proxies
only. A proxy can hold back replication traffic (a link whose client sent
``REPLCONF``): the replica then misses every later write while its link stays up and
clients keep writing, and a failover loses those writes. Failovers repeat: after each
the two servers swap roles (:attr:`SentinelSet.primary` is the current one) and the old
primary follows the new one through its proxy, so the next failover goes back.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from ..procs import wait_until
from .proxy import Proxies
from .redis_nodes import RedisNode, SentinelProcess, info, repl_offset
from .stack import BenchError


class SentinelSet:
    """A Sentinel-managed primary on free ports: a primary and a replica, each behind a
    proxy, and three sentinels (quorum 2). Every failover below leaves the servers with
    swapped roles (:attr:`primary`, :attr:`replica`); those that lose writes say how
    many bytes of the replication stream the new primary never got.

    ``workdir``: where the servers and sentinels keep their files and logs (a temporary
    directory, removed by :meth:`stop`, when None).
    """

    service = "pushsvc"
    down_after_ms = 3000  # 1 s: a CPU-starved primary was failed over on its own
    failover_timeout_ms = 5000
    hold_down_after_ms = 30_000  # :meth:`no_failover`

    def __init__(self, workdir: Path | str | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise BenchError("a Sentinel set needs redis-server (Debian's redis-server package)")
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="pushsvc-sentinel-"))
        self.nodes = [RedisNode(f"redis-{n}", exe, self.dir / f"redis-{n}") for n in "ab"]
        self.sentinels = [SentinelProcess(exe, self.dir / f"sentinel{i}") for i in range(3)]
        self.proxies: Proxies | None = None
        self._primary = 0  # index in ``nodes``
        self._paused: int | None = None  # the node whose proxy holds replication
        self.auto_failover_at = -math.inf  # monotonic: the last failover Sentinel started

    @property
    def primary(self) -> RedisNode:
        return self.nodes[self._primary]

    @property
    def replica(self) -> RedisNode:
        return self.nodes[1 - self._primary]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def start(self) -> SentinelSet:
        """Start everything and wait until the sentinels could fail over (blocking);
        everything is stopped again when that fails."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.proxies = Proxies([n.port for n in self.nodes], self.dir / "proxies.log")
            for node, port in zip(self.nodes, self.proxies.ports, strict=True):
                node.proxy_port = port
            self.primary.start()
            self.replica.start(replicaof=self.primary.proxy_port)
            name, proxy = self.service, self.primary.proxy_port
            monitor = (
                f"sentinel monitor {name} 127.0.0.1 {proxy} 2\n"
                f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {name} {self.failover_timeout_ms}\n"
            )
            for sentinel in self.sentinels:
                sentinel.start(monitor)
            # Sentinels find the replica in the primary's INFO and each other through
            # hello messages (every 2 s): a failover needs both.
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    # -- state ------------------------------------------------------------------------

    def master_ports(self) -> set[int]:
        """The primary's (proxy) port as each sentinel names it now."""
        ports = set()
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                addr = client.sentinel_get_master_addr_by_name(self.service)
            ports.add(int(addr[1]))
        return ports

    def _named(self, node: RedisNode) -> bool:
        return self.master_ports() == {node.proxy_port}

    def healthy(self) -> bool:
        """Could the sentinels fail over now? Every sentinel names the primary, knows the
        two other sentinels and the replica (up), and the replica follows the primary."""
        try:
            link = info(self.replica.port, "replication")
        except redis.RedisError:
            return False
        if link.get("master_port") != self.primary.proxy_port:
            return False
        if link.get("master_link_status") != "up":
            return False
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                state = client.sentinel_master(self.service)
                replicas = client.sentinel_slaves(self.service)
            if state["port"] != self.primary.proxy_port or state["num-other-sentinels"] < 2:
                return False
            if set(str(state["flags"]).split(",")) != {"master"}:
                return False
            if not any(_ready(r, self.replica.proxy_port) for r in replicas):
                return False
        return True

    def wait_healthy(self, timeout: float = 60) -> bool:
        """Wait until the set could fail over again; True when the sentinels had
        failed over on their own meanwhile (the roles here follow them)."""
        moved = False

        def settled() -> bool:
            nonlocal moved
            if self._named(self.replica):  # a failover we did not ask for
                self._primary, moved = 1 - self._primary, True
            return self.healthy()

        wait_until(settled, timeout, "the Sentinel set ready to fail over")
        return moved

    def exited(self) -> list[str]:
        """The set's processes that are not running."""
        down = [n.name for n in self.nodes if not n.alive()]
        down += [f"sentinel{i}" for i, s in enumerate(self.sentinels) if not s.alive()]
        if self.proxies is None or self.proxies.proc.poll() is not None:
            down.append("proxies")
        return down

    # -- faults -------------------------------------------------------------------------

    @contextlib.contextmanager
    def no_failover(self) -> Iterator[None]:
        """Inside, the sentinels call the primary down only after ``hold_down_after_ms``:
        an outage shorter than that is not failed over."""
        self._down_after(self.hold_down_after_ms)
        try:
            yield
        finally:
            self._down_after(self.down_after_ms)

    def _down_after(self, ms: int) -> None:
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                client.sentinel_set(self.service, "down-after-milliseconds", ms)

    def hold_replication(self) -> float:
        """Stop replication: from now on the replica misses every write. Waits first
        until the replica has everything written before the moment returned (wall
        clock), so the writes a failover would lose were all acknowledged after it."""
        stopped_at = time.time()
        written = repl_offset(self.primary.port)
        wait_until(lambda: repl_offset(self.replica.port) >= written, 10, "the replica caught up")
        self.pause_replication()
        return stopped_at

    def pause_replication(self) -> None:
        """From now on the replica misses every write (see :meth:`kill_primary`)."""
        assert self.proxies is not None
        link = info(self.replica.port, "replication")
        if link["master_port"] != self.primary.proxy_port or link["master_link_status"] != "up":
            raise BenchError(f"the replica does not follow the primary: {link}")
        self.proxies.pause(self._primary)
        self._paused = self._primary

    def _promoted(self) -> None:
        """The replica is the primary now: swap the roles, and cut the links a pause held."""
        self._primary = 1 - self._primary
        if self._paused is not None and self.proxies is not None:
            self.proxies.resume(self._paused)
        self._paused = None

    def _ask_failover(self) -> None:
        """``SENTINEL FAILOVER`` (retried while a sentinel refuses: it may not have seen
        the replica's last INFO yet)."""
        errors: list[str] = []

        def asked() -> bool:
            sentinel = self.sentinels[len(errors) % len(self.sentinels)]
            try:
                with sentinel.client() as client:
                    client.execute_command("SENTINEL", "FAILOVER", self.service)
                return True
            except redis.ResponseError as exc:
                errors.append(str(exc))
                return False

        try:
            wait_until(asked, 20, "a sentinel accepting SENTINEL FAILOVER")
        except TimeoutError as exc:
            raise BenchError(f"{exc}: {errors[-3:]}") from None

    def failover(self) -> None:
        """A planned failover that loses nothing: writes are paused on the primary until
        the replica has them all and is promoted, then the old primary follows it and
        drops its clients (as Sentinel itself does when it converts it, seconds later)."""
        old, new = self.primary, self.replica
        with redis.Redis(port=old.port, socket_timeout=5) as client:
            client.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
            try:
                written = repl_offset(old.port)
                wait_until(lambda: repl_offset(new.port) == written, 5, "replica caught up")
                self._ask_failover()
                wait_until(lambda: new.role() == "master", 10, "replica promoted")
                _demote(client, new)
            finally:
                client.execute_command("CLIENT", "UNPAUSE")
        wait_until(lambda: self._named(new), 20, "every sentinel naming the new primary")
        self._promoted()

    def failover_losing_writes(self) -> tuple[float, int]:
        """After :meth:`hold_replication`: ``SENTINEL FAILOVER``, then, as soon as the
        replica is promoted, the old primary follows it and drops its clients (writes
        paused meanwhile, so none fails with READONLY). Returns when that was done
        (wall clock: the old primary took its last write before) and how many bytes of
        writes the new primary never got (at least)."""
        old, new = self.primary, self.replica
        got = repl_offset(new.port)
        self._ask_failover()
        wait_until(lambda: new.role() == "master", 20, "replica promoted")
        with redis.Redis(port=old.port, socket_timeout=5) as client:
            client.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
            try:
                written = repl_offset(old.port)
                _demote(client, new)
                demoted_at = time.time()
            finally:
                client.execute_command("CLIENT", "UNPAUSE")
        wait_until(lambda: self._named(new), 20, "every sentinel naming the new primary")
        self._promoted()
        return demoted_at, written - got

    def sentinel_failover(self) -> None:
        """``SENTINEL FAILOVER`` alone, until every sentinel names the replica. The old
        primary keeps its clients and takes their writes until Sentinel demotes it,
        about 10 s later (:meth:`wait_demoted`); those writes are then lost."""
        self._ask_failover()
        wait_until(lambda: self._named(self.replica), 20, "every sentinel naming the replica")
        self._promoted()

    def wait_demoted(self) -> None:
        """After :meth:`sentinel_failover`: wait until Sentinel has made the old primary
        (now :attr:`replica`) a replica (and dropped its clients)."""
        old = self.replica
        wait_until(lambda: old.role() == "slave", 30, "Sentinel demoting the old primary")

    def kill_primary(self) -> int:
        """SIGKILL the primary; returns how many bytes of its replication stream the
        replica never got (the writes the coming failover loses: more than 0 after
        :meth:`pause_replication` and some writes). Then :meth:`wait_promoted`."""
        written = repl_offset(self.primary.port)
        self.primary.kill()
        return written - repl_offset(self.replica.port)

    def wait_promoted(self) -> None:
        """Wait until every sentinel names the replica as the primary (the old primary
        stays down: :meth:`rejoin` brings it back)."""
        # A sentinel starts no failover within twice the failover timeout of its last.
        timeout = 30 + 2 * self.failover_timeout_ms / 1000
        wait_until(lambda: self._named(self.replica), timeout, "a failover to the replica")
        self.auto_failover_at = time.monotonic()
        self._promoted()

    def may_kill_over(self) -> bool:
        """Would the sentinels fail over a dead primary at once? Each voter starts no
        failover within twice the failover timeout of the one it voted in."""
        quiet_s = 2 * self.failover_timeout_ms / 1000 + 5
        return time.monotonic() - self.auto_failover_at > quiet_s

    def rejoin(self) -> None:
        """Start the replica (a killed old primary) again, following the primary."""
        if not self.replica.alive():
            self.replica.start(replicaof=self.primary.proxy_port)

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for node in self.nodes:
            node.kill()
        if self.proxies is not None:
            self.proxies.close()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def _ready(replica: dict[str, Any], port: int) -> bool:
    """A sentinel's view of a replica it could promote."""
    down = replica["is_sdown"] or replica["is_odown"] or replica["is_disconnected"]
    return bool(replica["port"] == port and not down)


def _demote(old: redis.Redis, new: RedisNode) -> None:
    """Make the server of ``old`` (a client on it) follow ``new`` and drop its clients,
    as Sentinel would when it converts it, seconds later."""
    commands = (
        ("REPLICAOF", "127.0.0.1", new.proxy_port),
        ("CLIENT", "KILL", "TYPE", "normal"),  # not this client itself (SKIPME yes)
        ("CLIENT", "KILL", "TYPE", "pubsub"),
    )
    for command in commands:
        old.execute_command(*command)  # type: ignore[no-untyped-call]
