"""A private Redis Cluster on this machine, for the tests and the benches: primaries
and their replicas as ``redis-server`` processes on free ports (``redis-server
--cluster-enabled yes``), joined by ``redis-cli --cluster create``."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Self

import redis

from .procs import (
    LOCALHOST,
    RedisServer,
    StartFailed,
    TlsFiles,
    free_port,
    hold_port,
    wait_until,
)

BUS_OFFSET = 10000  # a node's cluster bus listens this many ports above its own


def cluster_port() -> int:
    """A free port whose cluster bus port is free too."""
    return free_port(BUS_OFFSET)


@dataclass
class ClusterNode(RedisServer):
    """One node: a RedisServer with cluster mode on (its ``nodes.conf`` in its dir)."""

    port: int = field(default_factory=cluster_port)

    persistence: ClassVar[tuple[str, ...]] = (
        "--appendonly", "no", "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
    )  # fmt: skip

    def start(self, timeout: float = 30) -> Self:
        hold_port(self.port + BUS_OFFSET)
        return super().start(timeout)

    def cluster_info(self) -> dict[str, str]:
        with self.client() as client:
            text = client.execute_command("CLUSTER", "INFO")
        text = text.decode() if isinstance(text, bytes) else str(text)
        pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {k: v.strip() for k, v in pairs}

    def replication(self) -> dict[str, object]:
        with self.client() as client:
            return dict(client.info("replication"))


@dataclass
class LocalCluster:
    """``primaries`` primaries with ``replicas`` replicas each, every slot assigned."""

    primaries: int = 3
    replicas: int = 1
    password: str = ""  # every node's (AUTH), when set
    tls: TlsFiles | None = None  # every node speaks TLS only, with these files, when set
    nodes: list[ClusterNode] = field(default_factory=list)
    cli: str = field(default_factory=lambda: shutil.which("redis-cli") or "redis-cli")

    @property
    def seeds(self) -> str:
        """Every node as ``host:port,...``: what a cluster client starts from."""
        return ",".join(f"{LOCALHOST}:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 60) -> Self:
        """Start the nodes, join them, and wait until each says the cluster is ok."""
        try:
            for _ in range(self.primaries * (1 + self.replicas)):
                self.nodes.append(ClusterNode(password=self.password, tls=self.tls).start())
            args = [self.cli, *(self.tls.cli_args() if self.tls else [])]
            args += ["--cluster", "create", *self.seeds.split(",")]
            args += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
            env = {**os.environ, "REDISCLI_AUTH": self.password} if self.password else None
            done = subprocess.run(args, capture_output=True, timeout=timeout, check=False, env=env)
            if done.returncode != 0:
                raise StartFailed(f"redis-cli --cluster create failed: {done.stdout[-2000:]!r}")
            wait_until(self.ok, timeout, "every node saying cluster_state:ok")
        except BaseException:
            self.stop()
            raise
        return self

    def ok(self) -> bool:
        """Every node reachable, every slot served, each node knows every other, and each
        replica in sync with its primary (else it could not take over from it)."""
        want = str(len(self.nodes))
        try:
            infos = [n.cluster_info() for n in self.nodes]
            links = [n.replication() for n in self.nodes]
        except redis.RedisError:
            return False
        return all(
            i.get("cluster_state") == "ok"
            and i.get("cluster_slots_ok") == "16384"
            and i.get("cluster_known_nodes") == want
            for i in infos
        ) and all(r.get("role") == "master" or r.get("master_link_status") == "up" for r in links)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes.clear()

    def slot_owners(self) -> dict[tuple[int, int], int]:
        """Each slot range and the port of the primary that serves it (CLUSTER SLOTS)."""
        for node in self.nodes:
            try:
                with node.client() as client:
                    rows = client.execute_command("CLUSTER", "SLOTS")
            except redis.RedisError:
                continue
            return {(int(r[0]), int(r[1])): int(r[2][1]) for r in rows}
        raise redis.ConnectionError("no node of the cluster answers")

    def owner(self, slot: int) -> ClusterNode:
        """The primary that serves ``slot`` now."""
        port = next(p for (lo, hi), p in self.slot_owners().items() if lo <= slot <= hi)
        return next(n for n in self.nodes if n.port == port)

    def replicas_of(self, node: ClusterNode) -> list[ClusterNode]:
        """The nodes replicating primary ``node`` now (each one's INFO replication)."""
        found = []
        for other in self.nodes:
            info = other.replication()
            if info.get("role") == "slave" and info.get("master_port") == node.port:
                found.append(other)
        return found

    def node_id(self, node: ClusterNode) -> str:
        with node.client() as client:
            return str(client.execute_command("CLUSTER", "MYID").decode())

    def fail_over(
        self, node: ClusterNode, timeout: float = 30, on_kill: Callable[[], None] = lambda: None
    ) -> ClusterNode:
        """SIGKILL primary ``node`` (then ``on_kill()``) and wait until its replica serves
        its slots; the new primary. (The killed node stays down.)"""
        slots = [lo for (lo, _), port in self.slot_owners().items() if port == node.port]
        node.kill()
        on_kill()
        self.nodes.remove(node)

        def promoted() -> bool:
            try:
                owners = self.slot_owners()
            except redis.RedisError:
                return False
            live = {n.port for n in self.nodes}
            return all(p in live for (lo, _), p in owners.items() if lo in slots) and all(
                n.cluster_info().get("cluster_state") == "ok" for n in self.nodes
            )

        wait_until(promoted, timeout, "a replica serving the killed primary's slots")
        return self.owner(slots[0])

    def move_slot(
        self,
        slot: int,
        target: ClusterNode,
        batch: int = 10,
        pause: Callable[[], None] = lambda: None,
    ) -> None:
        """Move one slot to ``target`` as ``redis-cli --cluster reshard`` does: mark it
        importing and migrating, MIGRATE its keys ``batch`` at a time (``pause`` between
        batches: clients meet ASK redirects meanwhile), then give it to ``target``."""
        source = self.owner(slot)
        src_id, dst_id = self.node_id(source), self.node_id(target)
        with (
            source.client(10) as src,
            target.client(10) as dst,
        ):
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            auth = ("AUTH", self.password) if self.password else ()
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
                src.execute_command(
                    "MIGRATE", LOCALHOST, target.port, "", 0, 10000, "REPLACE", *auth, "KEYS", *keys
                )
                pause()
            dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        for node in self.nodes:
            if node.port not in (source.port, target.port):
                with contextlib.suppress(redis.RedisError):
                    with node.client() as client:
                        client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)

    def rejoin(self, node: ClusterNode, timeout: float = 60) -> None:
        """Start a node killed by :meth:`fail_over` again (its ``nodes.conf`` kept): it
        comes back as a replica of the node that took over, and is waited for in sync."""
        node.start()
        self.nodes.append(node)
        wait_until(self.ok, timeout, f"node :{node.port} back in the cluster, in sync")

    def primary_nodes(self) -> list[ClusterNode]:
        """The nodes that serve slots now."""
        ports = set(self.slot_owners().values())
        return [n for n in self.nodes if n.port in ports]
